"""Fixed-feature baselines: MFCC bag-of-words, spherical K-means features, linear and MLP regressors.

Everything takes the stored log-mels (``log(1 + C·S)`` of mel power ``S``, shape
``(n_mels, n_frames)``, float16 is fine) and returns numpy:

* :func:`mfcc_frames` — 13 MFCCs + Δ + ΔΔ per frame (thesis §4.5.1), recovered from the log-mel
  by undoing the compression, so no second pass over the audio is needed;
* :class:`BagOfWords` — K-means vocabulary over MFCC frames, per-clip histogram of nearest
  words, PCA keeping 95% of the variance (thesis §4.5.1: 4,000 words);
* :class:`SphericalKMeansFeatures` — PCA-whitened 4-frame windows, spherical K-means
  dictionary, dot-product encoding, max-pool over ~2 s then mean (ISMIR 2014 §3.3: 2,048 means);
* :func:`fit_linear` / :func:`fit_mlp` — ridge regression and a 1,000-ReLU MLP from clip
  features to latent factors, each returning an object with ``predict(features) -> (n, f)``;
* :func:`select_linear` / :func:`select_bow_linear` — the ridge penalty (and the BoW vocabulary
  size) chosen on a validation split, as the CNN's epoch is chosen by early stopping.

All are deterministic for a given ``seed`` (and, for the MLP, thread count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import librosa
import numpy as np
import scipy.fft
import scipy.linalg
import scipy.sparse as sp
import torch
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA

__all__ = [
    "BagOfWords",
    "LinearRegressor",
    "MLPRegressor",
    "SphericalKMeansFeatures",
    "fit_linear",
    "fit_mlp",
    "mfcc_frames",
    "select_bow_linear",
    "select_linear",
    "spherical_kmeans",
]

#: Ridge penalties tried when one is chosen on a validation split.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _as_log_mel(x: object, where: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{where} must be a non-empty (n_mels, n_frames) array, got shape {a.shape}")
    return a


def _clip_list(clips: object, what: str) -> list:
    if isinstance(clips, np.ndarray) and clips.ndim == 2:
        raise ValueError(f"{what} must be a sequence of clips (or a 3-D batch), got one 2-D array {clips.shape}")
    out = list(clips)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


# ---------------------------------------------------------------------------------------------
# MFCCs
# ---------------------------------------------------------------------------------------------


def mfcc_frames(
    log_mel: np.ndarray,
    *,
    compression: float = 10_000.0,
    n_mfcc: int = 13,
    top_db: float | None = 80.0,
    amin: float = 1e-10,
    delta_width: int = 9,
) -> np.ndarray:
    """MFCCs with first and second differences, per frame, from a stored log-mel.

    ``S = expm1(x) / C`` undoes the compression; ``10·log10(max(S, amin))`` clipped to
    ``top_db`` below its peak is ``librosa.power_to_db(S)`` (``ref=1``); an orthonormal DCT-II
    over bands keeps ``n_mfcc`` coefficients (``librosa.feature.mfcc(S=dB)``); Δ and ΔΔ are
    ``librosa.feature.delta`` (Savitzky-Golay, ``width=delta_width``). With the stored
    window 1024 / hop 512 this is the thesis' 39-d bag-of-words input (§4.5.1).

    Parameters
    ----------
    log_mel : np.ndarray [shape=(n_mels, n_frames)]
        ``log(1 + C·S)`` of mel power; float16 is accepted (computed in float64).
    compression : float > 0
        The ``C`` the log-mel was made with. Default 10,000.
    n_mfcc : int
        Coefficients kept (default 13), at most ``n_mels``.
    top_db : float >= 0 or None
        Dynamic-range floor below the clip's peak, as ``librosa.power_to_db``. Default 80.
    amin : float > 0
        Power floor before the log. Default 1e-10.
    delta_width : odd int >= 3
        Frames in the difference filter; shortened (to the largest odd count that fits) for
        clips with fewer frames, and Δ = ΔΔ = 0 for clips of 1 or 2 frames.

    Returns
    -------
    frames : np.ndarray [shape=(n_frames, 3 * n_mfcc), dtype=float32]
        ``[mfcc | Δ | ΔΔ]`` per frame (time first, ready for K-means).
    """
    x = _as_log_mel(log_mel, "log_mel").astype(np.float64)
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not compression > 0:
        raise ValueError(f"compression must be a number > 0, got {compression!r}")
    n_mfcc = _check_int("n_mfcc", n_mfcc)
    if n_mfcc > x.shape[0]:
        raise ValueError(f"n_mfcc={n_mfcc} exceeds the {x.shape[0]} mel bands of the input")
    width = _check_int("delta_width", delta_width, 3)
    if width % 2 == 0:
        raise ValueError(f"delta_width must be odd, got {delta_width!r}")
    power = np.expm1(x) / float(compression)
    db = 10.0 * np.log10(np.maximum(power, amin))
    if top_db is not None:
        if top_db < 0:
            raise ValueError(f"top_db must be >= 0 or None, got {top_db!r}")
        db = np.maximum(db, db.max() - float(top_db))
    mfcc = scipy.fft.dct(db, type=2, axis=0, norm="ortho")[:n_mfcc]
    t = mfcc.shape[1]
    # Savitzky-Golay 'interp' needs width <= n_frames: shrink the window for short clips.
    width = min(width, t if t % 2 == 1 else t - 1)
    if width >= 3:
        d1 = librosa.feature.delta(mfcc, width=width, order=1, axis=-1)
        d2 = librosa.feature.delta(mfcc, width=width, order=2, axis=-1)
    else:
        d1 = d2 = np.zeros_like(mfcc)
    return np.ascontiguousarray(np.concatenate([mfcc, d1, d2]).T, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Bag of words
# ---------------------------------------------------------------------------------------------


class BagOfWords:
    """Vector-quantised MFCC frames -> per-clip word histogram -> PCA (thesis §4.5.1).

    Parameters
    ----------
    n_words : int
        Vocabulary size (K-means clusters). Default 4,000 as in the thesis; a catalog of a few
        hundred clips needs far fewer (e.g. 64).
    features : {"mfcc", "frames"}
        ``"mfcc"`` (default): clips are log-mels ``(n_mels, n_frames)`` turned into frames by
        :func:`mfcc_frames`. ``"frames"``: clips are already ``(n_frames, d)`` frame features.
    compression, n_mfcc : float, int
        Passed to :func:`mfcc_frames`.
    max_frames : int
        Frames sampled (evenly over clips, at random within each) to fit the vocabulary.
        Default 200,000.
    variance : float in (0, 1] or None
        Fraction of histogram variance PCA keeps (default 0.95); ``None`` skips PCA.
    standardize : bool
        Z-score frame features before K-means (default True): otherwise the 0th MFCC, whose
        scale is that of a sum of dB values, decides every distance.
    batch_size : int
        MiniBatchKMeans batch size. Default 4,096.
    seed : int
        Seeds frame sampling, K-means and PCA.

    Attributes
    ----------
    kmeans_ : MiniBatchKMeans
    pca_ : PCA or None
    n_components_ : int
        Width of :meth:`transform`'s output.
    """

    def __init__(
        self,
        n_words: int = 4000,
        *,
        features: str = "mfcc",
        compression: float = 10_000.0,
        n_mfcc: int = 13,
        max_frames: int = 200_000,
        variance: float | None = 0.95,
        standardize: bool = True,
        batch_size: int = 4096,
        seed: int = 0,
    ) -> None:
        self.n_words = _check_int("n_words", n_words, 2)
        if features not in ("mfcc", "frames"):
            raise ValueError(f"features must be 'mfcc' or 'frames', got {features!r}")
        self.features = features
        self.compression = compression
        self.n_mfcc = n_mfcc
        self.max_frames = _check_int("max_frames", max_frames)
        self.variance = None if variance is None else _check_fraction("variance", variance)
        self.standardize = bool(standardize)
        self.batch_size = _check_int("batch_size", batch_size)
        self.seed = int(seed)
        self.kmeans_: MiniBatchKMeans | None = None
        self.pca_: PCA | None = None

    def _frames(self, clip: object, i: int) -> np.ndarray:
        if self.features == "mfcc":
            return mfcc_frames(_as_log_mel(clip, f"clips[{i}]"), compression=self.compression, n_mfcc=self.n_mfcc)
        a = np.asarray(clip, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"clips[{i}] must be a non-empty (n_frames, d) array, got shape {a.shape}")
        return a

    def _scaled(self, frames: np.ndarray) -> np.ndarray:
        return (frames - self._mean) / self._scale if self.standardize else frames

    def fit(self, clips: Sequence[np.ndarray]) -> "BagOfWords":
        """Learn the vocabulary from a frame sample of ``clips``, then PCA on their histograms.

        Raises
        ------
        ValueError
            If the sample holds fewer frames than ``n_words``.
        """
        clips = _clip_list(clips, "clips")
        rng = np.random.default_rng(self.seed)
        per_clip = max(1, math.ceil(self.max_frames / len(clips)))
        sample = []
        for i, clip in enumerate(clips):
            f = self._frames(clip, i)
            if len(f) > per_clip:  # evenly over clips, so long clips do not dominate the vocabulary
                f = f[np.sort(rng.choice(len(f), per_clip, replace=False))]
            sample.append(f)
        sample = np.concatenate(sample)[: self.max_frames]
        if len(sample) < self.n_words:
            raise ValueError(f"only {len(sample)} frames to fit n_words={self.n_words}; lower n_words or add clips")
        self._mean = sample.mean(axis=0)
        sd = sample.std(axis=0)
        self._scale = np.where(sd > 0, sd, 1.0).astype(np.float32)
        self.kmeans_ = MiniBatchKMeans(
            n_clusters=self.n_words, batch_size=self.batch_size, n_init=3, random_state=self.seed
        ).fit(self._scaled(sample))
        hist = self.histograms(clips)
        if self.variance is None:
            self.pca_ = None
        else:
            self.pca_ = PCA(n_components=self.variance, svd_solver="full", random_state=self.seed).fit(hist)
        return self

    @property
    def n_components_(self) -> int:
        if self.kmeans_ is None:
            raise RuntimeError("BagOfWords is not fitted; call fit() first")
        return self.n_words if self.pca_ is None else int(self.pca_.n_components_)

    def histograms(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Normalised word counts ``(n_clips, n_words)``, float32, each row summing to 1."""
        if self.kmeans_ is None:
            raise RuntimeError("BagOfWords is not fitted; call fit() first")
        clips = _clip_list(clips, "clips")
        out = np.zeros((len(clips), self.n_words), dtype=np.float32)
        for i, clip in enumerate(clips):
            words = self.kmeans_.predict(self._scaled(self._frames(clip, i)))
            out[i] = np.bincount(words, minlength=self.n_words) / len(words)
        return out

    def transform(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Clip features ``(n_clips, n_components_)``, float32 (PCA of :meth:`histograms`)."""
        hist = self.histograms(clips)
        return hist if self.pca_ is None else self.pca_.transform(hist).astype(np.float32)

    def fit_transform(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        clips = _clip_list(clips, "clips")
        return self.fit(clips).transform(clips)


# ---------------------------------------------------------------------------------------------
# Spherical K-means features
# ---------------------------------------------------------------------------------------------


def spherical_kmeans(
    data: np.ndarray, *, n_centroids: int, n_iter: int = 10, seed: int = 0, chunk: int = 8192
) -> np.ndarray:
    """Spherical K-means: unit-norm centroids maximising the summed cosine to assigned points.

    Rows of ``data`` are normalised; each iteration assigns every row to the centroid of largest
    dot product and sets each centroid to the normalised sum of its rows. A centroid left
    without rows is re-seeded with the worst-represented rows (lowest best similarity), so all
    ``n_centroids`` stay in use. Stops early once assignments no longer change.

    Parameters
    ----------
    data : np.ndarray [shape=(n, d)]
    n_centroids : int <= n
    n_iter : int
        Maximum iterations. Default 10.
    seed : int
        Picks the initial centroids (random distinct rows).
    chunk : int
        Rows per similarity block, bounding memory to ``chunk * n_centroids`` floats.

    Returns
    -------
    centroids : np.ndarray [shape=(n_centroids, d), dtype=float32], rows of unit norm
    """
    x = np.asarray(data, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"data must be 2-D (n, d), got shape {x.shape}")
    k = _check_int("n_centroids", n_centroids)
    n_iter = _check_int("n_iter", n_iter)
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} rows cannot seed n_centroids={k}; lower n_centroids or sample more windows")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    c = x[rng.choice(x.shape[0], k, replace=False)].copy()
    n = x.shape[0]
    assign = np.full(n, -1, dtype=np.int64)
    for _ in range(n_iter):
        new_assign = np.empty(n, dtype=np.int64)
        best = np.empty(n, dtype=np.float32)
        for s in range(0, n, chunk):
            sim = x[s : s + chunk] @ c.T
            new_assign[s : s + chunk] = sim.argmax(axis=1)
            best[s : s + chunk] = sim.max(axis=1)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
        # Sum of rows per centroid as a sparse one-hot product: O(n·d), no Python loop.
        onehot = sp.csr_matrix((np.ones(n, dtype=np.float32), (assign, np.arange(n))), shape=(k, n))
        sums = np.asarray(onehot @ x)
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if empty.size:
            sums[empty] = x[np.argsort(best, kind="stable")[: empty.size]]
        c = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        c = c.astype(np.float32, copy=False)
    return c


class SphericalKMeansFeatures:
    """Unsupervised clip features from spherical K-means on whitened log-mel windows (ISMIR 2014 §3.3).

    Fit: random windows of ``window`` consecutive frames (``n_mels · window`` = 512 values at
    the defaults) are PCA-whitened, keeping ``variance`` of the variance, and clustered with
    :func:`spherical_kmeans`. Transform: every window of the clip is whitened and dotted with
    every centroid — one linear map, ``projection_ = whitening · centroidsᵀ``, applied as a
    ``window``-tap convolution over time — then max-pooled over groups of ``pool_frames``
    windows (~2 s) and averaged over the clip.

    Parameters
    ----------
    n_centroids : int
        Dictionary size. Default 2,048 as in the paper.
    window : int
        Consecutive frames per window. Default 4.
    variance : float in (0, 1]
        Fraction of variance the whitening keeps. Default 0.99.
    whiten_epsilon : float >= 0
        Added to the kept eigenvalues before the inverse square root, so near-silent directions
        are not blown up into noise (in squared log-mel units). Default 0.01.
    pool_frames : int
        Windows per max-pool group; 86 frames ≈ 2.0 s at hop 512 / 22,050 Hz.
    n_iter : int
        Spherical K-means iterations. Default 10.
    max_windows : int
        Windows sampled to fit (evenly over clips). Default 100,000.
    seed : int

    Attributes
    ----------
    mean_ : (n_mels·window,)
    whitening_ : (n_mels·window, n_kept)
        ``V_k / sqrt(λ_k + ε)``: whitened = ``(window − mean_) @ whitening_``.
    centroids_ : (n_centroids, n_kept), unit rows
    projection_ : (n_mels·window, n_centroids)
    bias_ : (n_centroids,)
        ``−mean_ @ projection_``.
    """

    def __init__(
        self,
        n_centroids: int = 2048,
        *,
        window: int = 4,
        variance: float = 0.99,
        whiten_epsilon: float = 0.01,
        pool_frames: int = 86,
        n_iter: int = 10,
        max_windows: int = 100_000,
        seed: int = 0,
    ) -> None:
        self.n_centroids = _check_int("n_centroids", n_centroids)
        self.window = _check_int("window", window)
        self.variance = _check_fraction("variance", variance)
        if isinstance(whiten_epsilon, bool) or not isinstance(whiten_epsilon, (int, float)) or whiten_epsilon < 0:
            raise ValueError(f"whiten_epsilon must be a number >= 0, got {whiten_epsilon!r}")
        self.whiten_epsilon = float(whiten_epsilon)
        self.pool_frames = _check_int("pool_frames", pool_frames)
        self.n_iter = _check_int("n_iter", n_iter)
        self.max_windows = _check_int("max_windows", max_windows)
        self.seed = int(seed)
        self.projection_: np.ndarray | None = None

    def fit(self, log_mels: Sequence[np.ndarray]) -> "SphericalKMeansFeatures":
        """Learn the whitening and the dictionary from random windows of ``log_mels``.

        Raises
        ------
        ValueError
            If no clip has ``window`` frames, or fewer windows than ``n_centroids`` are sampled.
        """
        clips = [_as_log_mel(m, f"log_mels[{i}]") for i, m in enumerate(_clip_list(log_mels, "log_mels"))]
        n_mels = clips[0].shape[0]
        for i, m in enumerate(clips):
            if m.shape[0] != n_mels:
                raise ValueError(f"log_mels[{i}] has {m.shape[0]} bands, log_mels[0] has {n_mels}")
        self.n_mels_ = n_mels
        rng = np.random.default_rng(self.seed)
        usable = [m for m in clips if m.shape[1] >= self.window]
        if not usable:
            raise ValueError(f"no clip has window={self.window} frames")
        per_clip = max(1, math.ceil(self.max_windows / len(usable)))
        batches = []
        for m in usable:
            starts = rng.integers(0, m.shape[1] - self.window + 1, size=per_clip)
            # (per_clip, n_mels, window) -> flattened band-major, the layout projection_ assumes
            idx = starts[:, None] + np.arange(self.window)
            batches.append(np.asarray(m, dtype=np.float32)[:, idx].transpose(1, 0, 2).reshape(per_clip, -1))
        x = np.concatenate(batches)[: self.max_windows]  # float32: 100k x 512 is 200 MB

        self.mean_ = x.mean(axis=0, dtype=np.float64)
        cov = np.zeros((x.shape[1], x.shape[1]))
        for s in range(0, len(x), 8192):  # accumulate in float64 without a float64 copy of x
            c = x[s : s + 8192] - self.mean_
            cov += c.T @ c
        cov /= len(x)
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
        total = evals.sum()
        if not total > 0:
            raise ValueError("the sampled windows have zero variance (all clips constant?)")
        kept = int(np.searchsorted(np.cumsum(evals) / total, self.variance - 1e-12) + 1)
        kept = min(kept, len(evals))
        self.whitening_ = evecs[:, :kept] / np.sqrt(evals[:kept] + self.whiten_epsilon)
        z = (x - self.mean_.astype(np.float32)) @ self.whitening_.astype(np.float32)
        self.centroids_ = spherical_kmeans(z, n_centroids=self.n_centroids, n_iter=self.n_iter, seed=self.seed)
        # Whitening then dictionary is one linear map: fold them, so encoding is a single product.
        self.projection_ = (self.whitening_ @ self.centroids_.T.astype(np.float64)).astype(np.float32)
        self.bias_ = (-self.mean_ @ self.projection_).astype(np.float32)
        return self

    def _check_fitted(self) -> None:
        if self.projection_ is None:
            raise RuntimeError("SphericalKMeansFeatures is not fitted; call fit() first")

    def encode(self, log_mel: np.ndarray) -> np.ndarray:
        """Dot products of every (whitened) window with every centroid.

        Parameters
        ----------
        log_mel : np.ndarray [shape=(n_mels, n_frames)]
            Clips shorter than ``window`` are zero-padded (zero = silence).

        Returns
        -------
        activations : np.ndarray [shape=(max(n_frames, window) - window + 1, n_centroids), dtype=float32]
        """
        self._check_fitted()
        m = _as_log_mel(log_mel, "log_mel").astype(np.float32)
        if m.shape[0] != self.n_mels_:
            raise ValueError(f"log_mel has {m.shape[0]} bands, the model was fitted on {self.n_mels_}")
        if m.shape[1] < self.window:
            m = np.pad(m, [(0, 0), (0, self.window - m.shape[1])])
        n = m.shape[1] - self.window + 1
        taps = self.projection_.reshape(self.n_mels_, self.window, -1)
        # A `window`-tap convolution as `window` frame-matrix products on shifted views: no
        # (n, n_mels·window) copy of the windows is ever made.
        acts = np.broadcast_to(self.bias_, (n, self.n_centroids)).copy()
        for j in range(self.window):
            acts += m[:, j : j + n].T @ taps[:, j, :]
        return acts

    def pool(self, activations: np.ndarray) -> np.ndarray:
        """Max over groups of ``pool_frames`` windows, then mean over groups -> ``(n_centroids,)``.

        A trailing group shorter than half of ``pool_frames`` is dropped when there are others
        (the max of a few windows is biased low against the max of a full group).
        """
        n = activations.shape[0]
        starts = np.arange(0, n, self.pool_frames)
        if len(starts) > 1 and n - starts[-1] < self.pool_frames / 2:
            starts, n = starts[:-1], starts[-1]
        maxes = np.maximum.reduceat(activations[:n], starts, axis=0)
        return maxes.mean(axis=0, dtype=np.float64).astype(np.float32)

    def transform(self, log_mels: Sequence[np.ndarray]) -> np.ndarray:
        """Clip features ``(n_clips, n_centroids)``, float32."""
        self._check_fitted()
        clips = _clip_list(log_mels, "log_mels")
        return np.stack([self.pool(self.encode(m)) for m in clips])

    def fit_transform(self, log_mels: Sequence[np.ndarray]) -> np.ndarray:
        clips = _clip_list(log_mels, "log_mels")
        return self.fit(clips).transform(clips)


# ---------------------------------------------------------------------------------------------
# Regressors
# ---------------------------------------------------------------------------------------------


def _xy(features: object, targets: object) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features (n, d) and targets (n, f) must be 2-D with the same n > 0, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features and targets must be finite")
    return x, y


def _standardizer(x: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    if not enabled:
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    sd = x.std(axis=0)
    return x.mean(axis=0), np.where(sd > 0, sd, 1.0)


def _check_features(features: object, d: int) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"features must have shape (n, {d}), got {x.shape}")
    return x


@dataclass(frozen=True)
class LinearRegressor:
    """``predict(features) = features @ weights + intercept``.

    Attributes
    ----------
    weights : np.ndarray [shape=(d, f)]
        In the units of the raw features (any standardisation is folded in).
    intercept : np.ndarray [shape=(f,)]
    """

    weights: np.ndarray
    intercept: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(n, d)`` -> ``(n, f)``, float32."""
        x = _check_features(features, self.weights.shape[0])
        return (x @ self.weights + self.intercept).astype(np.float32)


def fit_linear(features: np.ndarray, targets: np.ndarray, *, l2: float = 1e-2, standardize: bool = True) -> LinearRegressor:
    """Ridge regression from clip features to latent factors.

    Minimises ``mean_n ‖y_n − W x_n − b‖² + l2·‖W‖²`` in closed form. With ``standardize`` the
    features are z-scored first, so ``l2`` is relative to unit feature variance and one default
    serves BoW-PCA, K-means and any other features; ``l2=0`` is least squares (minimum norm).

    Parameters
    ----------
    features : np.ndarray [shape=(n, d)]
    targets : np.ndarray [shape=(n, f)]
    l2 : float >= 0
        Ridge penalty per unit of (standardised) feature variance. Default 0.01.
    standardize : bool
        Default True.

    Returns
    -------
    LinearRegressor
    """
    x, y = _xy(features, targets)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    mu, sd = _standardizer(x, standardize)
    xs = (x - mu) / sd
    xs -= xs.mean(axis=0)  # the intercept absorbs the means even when not standardising
    ym = y.mean(axis=0)
    n, d = xs.shape
    if l2 > 0:
        gram = xs.T @ xs / n + l2 * np.eye(d)
        w = scipy.linalg.solve(gram, xs.T @ (y - ym) / n, assume_a="pos")
    else:
        w = np.linalg.lstsq(xs, y - ym, rcond=None)[0]
    weights = w / sd[:, None]
    intercept = ym - (x.mean(axis=0)) @ weights
    return LinearRegressor(weights=weights, intercept=intercept)


class MLPRegressor:
    """One hidden ReLU layer: ``predict`` gives factors, ``embed`` the hidden activations
    (the ISMIR 2014 transfer features from the "top hidden layer")."""

    def __init__(self, net: torch.nn.Sequential, mean: np.ndarray, scale: np.ndarray) -> None:
        self.net = net.eval()
        self.mean = mean
        self.scale = scale

    def _input(self, features: np.ndarray) -> torch.Tensor:
        x = _check_features(features, self.mean.shape[0])
        return torch.as_tensor((x - self.mean) / self.scale, dtype=torch.float32)

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(n, d)`` -> ``(n, f)``, float32."""
        return self.net(self._input(features)).numpy()

    @torch.no_grad()
    def embed(self, features: np.ndarray) -> np.ndarray:
        """``(n, d)`` -> hidden activations ``(n, hidden)``, float32."""
        return self.net[1](self.net[0](self._input(features))).numpy()


def fit_mlp(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    hidden: int = 1000,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    dropout: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
) -> MLPRegressor:
    """A ``d -> hidden ReLU -> f`` MLP trained with Adam on MSE (thesis §4.5.1, ISMIR 2014).

    Parameters
    ----------
    features : np.ndarray [shape=(n, d)]
    targets : np.ndarray [shape=(n, f)]
    hidden : int
        Hidden ReLU units. Default 1,000 as in the papers.
    epochs, batch_size, lr, weight_decay : int, int, float, float
        Adam settings; each epoch visits every example once in a seeded random order.
    dropout : float in [0, 1)
        On the hidden layer during training.
    standardize : bool
        Z-score the features (default True).
    seed : int
        Seeds the initial weights and the example order; the result is reproducible for a seed
        at a fixed torch thread count. The global torch RNG is left untouched.

    Returns
    -------
    MLPRegressor
    """
    x, y = _xy(features, targets)
    hidden = _check_int("hidden", hidden)
    epochs = _check_int("epochs", epochs)
    batch_size = _check_int("batch_size", batch_size)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    mu, sd = _standardizer(x, standardize)
    xt = torch.as_tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity(),
            torch.nn.Linear(hidden, y.shape[1]),
        )
        order_rng = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        net.train()
        n = xt.shape[0]
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order_rng)
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return MLPRegressor(net, mu, sd)


def _nmse(pred: np.ndarray, target: np.ndarray) -> float:
    """``mean((pred − target)²) / mean_j var(target[:, j])`` (1 = predicting the mean)."""
    return float(np.mean((pred - target) ** 2) / np.asarray(target, np.float64).var(axis=0).mean())


def select_linear(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, *,
                  l2_grid: Sequence[float] = L2_GRID) -> tuple[LinearRegressor, float, float]:
    """The ridge regressor whose penalty of ``l2_grid`` scores the lowest NMSE on the valid split.

    Returns
    -------
    model : LinearRegressor
        Fitted on the train split with the chosen penalty.
    valid_nmse : float
    l2 : float
    """
    scores = {float(l2): _nmse(fit_linear(x_train, y_train, l2=float(l2)).predict(x_valid), y_valid) for l2 in l2_grid}
    best = min(scores, key=scores.get)
    return fit_linear(x_train, y_train, l2=best), scores[best], best


@dataclass
class BowSelection:
    """The BoW-MFCC + ridge baseline chosen on the valid split (:func:`select_bow_linear`)."""

    bow: "BagOfWords"
    model: LinearRegressor
    words: int
    l2: float
    valid_nmse: float
    x_train: np.ndarray
    x_valid: np.ndarray
    grid: dict[str, float]


def select_bow_linear(train_clips: Sequence[np.ndarray], y_train: np.ndarray, valid_clips: Sequence[np.ndarray],
                      y_valid: np.ndarray, *, words_grid: Sequence[int], l2_grid: Sequence[float] = L2_GRID,
                      compression: float, seed: int = 0) -> BowSelection:
    """BoW-MFCC + ridge with the vocabulary size and penalty that score best on the valid split.

    Every vocabulary size of ``words_grid`` (capped at a quarter of the train frames: the
    thesis' 4,000 words need far more frames than a small catalog has) × every penalty of
    ``l2_grid`` is fitted on the train clips and scored on the valid clips.

    Parameters
    ----------
    train_clips, valid_clips : sequence of np.ndarray [shape=(n_mels, n_frames_i)]
        Stored log-mels.
    y_train, y_valid : np.ndarray [shape=(n, f)]
        Targets (standardised factors).
    words_grid : sequence of int >= 2
    l2_grid : sequence of float >= 0
    compression : float
        The log-mels' ``C`` (to undo ``log(1 + C x)`` for the MFCCs).
    seed : int

    Returns
    -------
    BowSelection
        The fitted vocabulary and regressor, the chosen sizes, the valid NMSE, the features of
        both splits and the valid NMSE of every ``"<words>/<l2>"`` pair.
    """
    max_words = max(2, sum(m.shape[1] for m in train_clips) // 4)
    best, grid = None, {}
    for words in sorted({min(int(w), max_words) for w in words_grid}):
        bow = BagOfWords(words, compression=compression, seed=seed).fit(train_clips)
        x_train, x_valid = bow.transform(train_clips), bow.transform(valid_clips)
        for l2 in l2_grid:
            score = _nmse(fit_linear(x_train, y_train, l2=float(l2)).predict(x_valid), y_valid)
            grid[f"{words}/{float(l2):g}"] = score
            if best is None or score < best[0]:
                best = (score, words, float(l2), bow, x_train, x_valid)
    score, words, l2, bow, x_train, x_valid = best
    return BowSelection(bow=bow, model=fit_linear(x_train, y_train, l2=l2), words=words, l2=l2, valid_nmse=score,
                        x_train=x_train, x_valid=x_valid, grid=grid)
