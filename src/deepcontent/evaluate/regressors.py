"""The evaluation's fixed-feature regressors: clip log-mels -> predicted item factors (pure).

:class:`SplitArrays` holds one split's arrays (train / valid clips with standardised targets,
the clips to predict); :class:`FixedFeatures` fits the baselines on it, choosing every
hyper-parameter on the valid clips (as the CNN's epoch is chosen by early stopping), and shares
the BoW vocabulary and the spherical K-means dictionary between the cold-start methods, the tag
task and the transfer features. No storage, no engine: numpy in, numpy out.

Methods (each returns ``(predictions in raw factor units (n_test, f), info)``):

``random``          a seeded standard normal (the floor).
``bow_linear``      BoW-MFCC (vocabulary size and ridge penalty chosen on valid) + ridge.
``bow_mlp``         the same features + an MLP with 1,000 ReLU units.
``kmeans_linear``   spherical K-means features + ridge (penalty chosen on valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from deepcontent.models.baselines import (
    BagOfWords,
    BowSelection,
    SphericalKMeansFeatures,
    fit_mlp,
    select_bow_linear,
    select_linear,
)
from deepcontent.train.losses import nmse

__all__ = ["BackboneFeatures", "FixedFeatures", "SplitArrays"]


@dataclass
class SplitArrays:
    """One regression split as arrays.

    Attributes
    ----------
    train_clips, valid_clips, test_clips : list of np.ndarray [shape=(n_mels, n_frames_i)]
    y_train, y_valid : np.ndarray [shape=(n, f)]
        Standardised targets.
    target_mean, target_std : np.ndarray [shape=(f,)]
        Raw factors = ``z * std + mean``.
    """

    train_clips: list[np.ndarray]
    y_train: np.ndarray
    valid_clips: list[np.ndarray]
    y_valid: np.ndarray
    test_clips: list[np.ndarray]
    target_mean: np.ndarray
    target_std: np.ndarray

    def raw(self, z: np.ndarray) -> np.ndarray:
        """Standardised predictions -> factor units, float32."""
        return (z * self.target_std + self.target_mean).astype(np.float32)


@dataclass
class FixedFeatures:
    """The fixed-feature baselines on one split (features fitted once, on the train clips)."""

    data: SplitArrays
    compression: float
    words_grid: Sequence[int]
    kmeans_centroids: int
    mlp_epochs: int = 30
    seed: int = 0
    _bow: BowSelection | None = field(default=None, init=False, repr=False)
    _kmeans: SphericalKMeansFeatures | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ features
    def bow(self) -> BowSelection:
        """BoW-MFCC vocabulary + ridge chosen on valid (:func:`select_bow_linear`), fitted once."""
        if self._bow is None:
            d = self.data
            self._bow = select_bow_linear(d.train_clips, d.y_train, d.valid_clips, d.y_valid, words_grid=self.words_grid,
                                          compression=self.compression, seed=self.seed)
        return self._bow

    def vocabulary(self) -> BagOfWords:
        return self.bow().bow

    def kmeans(self) -> SphericalKMeansFeatures:
        """The spherical K-means dictionary (at most one centroid per 8 train frames)."""
        if self._kmeans is None:
            frames = sum(m.shape[1] for m in self.data.train_clips)
            k = max(2, min(self.kmeans_centroids, frames // 8))
            self._kmeans = SphericalKMeansFeatures(k, seed=self.seed).fit(self.data.train_clips)
        return self._kmeans

    # ------------------------------------------------------------------ methods
    def random(self) -> tuple[np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng(self.seed)
        return rng.standard_normal((len(self.data.test_clips), self.data.y_train.shape[1])).astype(np.float32), {}

    def bow_linear(self) -> tuple[np.ndarray, dict[str, Any]]:
        sel = self.bow()
        pred = sel.model.predict(sel.bow.transform(self.data.test_clips))
        return self.data.raw(pred), {"valid_nmse": sel.valid_nmse, "l2": sel.l2, "words": sel.words}

    def bow_mlp(self) -> tuple[np.ndarray, dict[str, Any]]:
        sel, d = self.bow(), self.data
        model = fit_mlp(sel.x_train, d.y_train, hidden=1000, epochs=self.mlp_epochs, weight_decay=1e-4, dropout=0.5,
                        seed=self.seed)
        return d.raw(model.predict(sel.bow.transform(d.test_clips))), {"valid_nmse": nmse(model.predict(sel.x_valid), d.y_valid)}

    def kmeans_linear(self) -> tuple[np.ndarray, dict[str, Any]]:
        km = self.kmeans()
        pred, info = self.linear(km, self.data)
        return pred, {**info, "centroids": km.n_centroids}

    @staticmethod
    def linear(features, data: SplitArrays) -> tuple[np.ndarray, dict[str, Any]]:
        """Ridge (penalty chosen on valid) on ``features.transform`` of ``data``'s clips: how
        the tag task reuses the vocabulary and the dictionary with its own targets."""
        x_tr, x_va = features.transform(data.train_clips), features.transform(data.valid_clips)
        model, valid_nmse, l2 = select_linear(x_tr, data.y_train, x_va, data.y_valid)
        return data.raw(model.predict(features.transform(data.test_clips))), {"valid_nmse": valid_nmse, "l2": l2}


@dataclass
class BackboneFeatures:
    """A network's penultimate layer as fixed features (mean over consecutive windows): how a
    pretrained backbone is scored without fine-tuning (``pretrained_linear``).

    Attributes
    ----------
    model : EmbeddingRegressor
        In eval mode.
    window_frames : int
    """

    model: Any
    window_frames: int

    def transform(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Clips ``(n_mels, n_frames_i)`` -> ``(n, embedding_dim)`` float32."""
        from deepcontent.embed.pooling import clip_outputs

        dim = self.model.n_factors
        _, emb = clip_outputs(self.model, clips, n_frames=self.window_frames, target_mean=np.zeros(dim),
                              target_std=np.ones(dim))
        return emb

