"""The bag-of-words MFCC + linear regression baseline (thesis §4.5.1) on the CNN's own split.

Same train / valid tracks, same standardised targets and the same NMSE as the ``train`` stage
(:func:`deepcontent.train.data.build_targets`), with whole-clip features: 13 MFCCs + Δ + ΔΔ per
frame, a K-means vocabulary fitted on train clips, per-clip word histograms, PCA to 95% of the
variance, then ridge regression. The vocabulary size and the ridge penalty are chosen on the
valid split, as the CNN's epoch is (early stopping), so the baseline gets at least the
selection advantage the CNN gets.

Runs on the driver: it reads the train and valid spectrograms through :class:`Storage`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.models.baselines import BagOfWords, fit_linear
from deepcontent.storage import Storage
from deepcontent.train.data import TrainingData, build_targets, list_matrix
from deepcontent.train.losses import nmse

__all__ = ["fit_bow_baseline"]

DEFAULT_L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _clips(storage: Storage, data: TrainingData, targets: pa.Table) -> tuple[list[np.ndarray], np.ndarray]:
    """Log-mels ``(n_mels, n_frames)`` and standardised targets ``(n, f)`` of ``targets``' tracks."""
    spec = storage.read_parquet(data.spectrogram_files, columns=["track_id", "n_mels", "n_frames", "mel"])
    pos = pc.index_in(targets["track_id"], value_set=spec["track_id"])
    if pos.null_count:
        raise ValueError(f"{pos.null_count} target tracks have no spectrogram; the inputs changed during the run")
    rows = spec.take(pos).to_pylist()
    mels = [np.frombuffer(r["mel"], dtype=np.float16).reshape(r["n_mels"], r["n_frames"]) for r in rows]
    return mels, list_matrix(targets["target"])


def fit_bow_baseline(
    cfg: Config,
    storage: Storage,
    *,
    data: TrainingData | None = None,
    words_grid: Sequence[int] | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2,
) -> dict:
    """Fit BoW-MFCC + ridge on the train tracks and score it on the valid tracks.

    Every vocabulary size × ridge penalty of the grids is fitted on train and scored on valid;
    the best pair is reported (the CNN's epoch is chosen on valid too, by early stopping).

    Parameters
    ----------
    cfg : Config
        ``train.baseline_words`` (vocabulary sizes tried), ``train.seed`` and
        ``spectrograms.compression`` are used.
    data : TrainingData, optional
        The split and targets (built from storage when not given).
    words_grid : sequence of int, optional
        Overrides ``train.baseline_words``.
    l2_grid : sequence of float
        Ridge penalties tried.

    Returns
    -------
    dict
        ``valid_nmse`` (best over the grids), ``n_words`` and ``l2`` of the best,
        ``valid_nmse_grid`` (``"<words>/<l2>" -> NMSE``), ``train_nmse`` and ``n_components``
        of the best, ``train_tracks``, ``valid_tracks``.
    """
    data = data if data is not None else build_targets(storage)
    train_mels, y_train = _clips(storage, data, data.train)
    valid_mels, y_valid = _clips(storage, data, data.valid)
    # the thesis' 4,000 words need far more frames than a small catalog has
    max_words = max(2, sum(m.shape[1] for m in train_mels) // 4)
    grid = sorted({min(int(w), max_words) for w in (words_grid or cfg.train.baseline_words)})
    scores: dict[tuple[int, float], float] = {}
    fitted = {}
    for words in grid:
        bow = BagOfWords(words, compression=cfg.spectrograms.compression, seed=cfg.train.seed).fit(train_mels)
        x_train, x_valid = bow.transform(train_mels), bow.transform(valid_mels)
        fitted[words] = (bow, x_train)
        for l2 in l2_grid:
            scores[(words, float(l2))] = nmse(fit_linear(x_train, y_train, l2=float(l2)).predict(x_valid), y_valid)
    words, l2 = min(scores, key=scores.get)
    bow, x_train = fitted[words]
    model = fit_linear(x_train, y_train, l2=l2)
    return {"valid_nmse": scores[(words, l2)], "n_words": words, "l2": l2,
            "valid_nmse_grid": {f"{w}/{r:g}": v for (w, r), v in sorted(scores.items())},
            "train_nmse": nmse(model.predict(x_train), y_train), "n_components": bow.n_components_,
            "train_tracks": len(train_mels), "valid_tracks": len(valid_mels)}
