"""Embedding audio outside the batch job: load a registered model, embed files, bytes or arrays.

>>> import deepcontent
>>> model = deepcontent.load_model(storage="s3://music-ml/deepcontent")   # the production model
>>> out = deepcontent.embed_audio(["a.flac", "s3://bucket/b.m4a", raw_bytes, (samples, 44100)], model=model)
>>> out.predicted_factors.shape, out.embeddings.shape, out.failures
((4, 50), (4, 400), {})

The computation is the embed stage's, step for step: the same decoder and log-mel front end
(:func:`~deepcontent.audio.features.compute_log_mel`, float16, with the settings the model was
trained on), the same window pooling (:func:`~deepcontent.embed.pooling.clip_outputs`), so a
track embedded here equals its row in the ``embeddings`` table to float rounding. Decoding runs
in this process (no sandbox): pass trusted files, or use the batch job for a catalog.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from deepcontent.storage import Storage

__all__ = ["AudioEmbeddings", "EmbeddingModel", "embed_audio", "load_model", "write_embeddings"]


@dataclass
class EmbeddingModel:
    """A registered model ready to embed audio: the network, its artifact, its settings."""

    version: str
    network: Any
    artifact: dict
    settings: Any  # MelSettings

    @property
    def n_factors(self) -> int:
        return int(self.artifact["n_factors"])


@dataclass
class AudioEmbeddings:
    """What :func:`embed_audio` returns, one row per item that embedded.

    Attributes
    ----------
    ids : list of str
        The items' names (path / URI, ``item-<i>`` for bytes and arrays), in input order.
    predicted_factors : np.ndarray [shape=(n, n_factors), dtype=float32]
        In WMF units, as the ``embeddings`` table's ``predicted_factors``.
    embeddings : np.ndarray [shape=(n, embedding_dim), dtype=float32]
    model_version : str
    failures : dict
        ``{id: "reason: detail"}`` for items that did not decode (empty, undecodable, ...).
    """

    ids: list[str]
    predicted_factors: np.ndarray
    embeddings: np.ndarray
    model_version: str
    failures: dict[str, str] = field(default_factory=dict)


def _storage(storage: Storage | str | None) -> Storage:
    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, str):
        from deepcontent.config import StorageConfig

        return Storage.from_config(StorageConfig(root=storage))
    from deepcontent.config import load_config

    cfg = load_config(None)
    if cfg.storage.embedded_s3:
        raise ValueError("the embedded default's store is served only while a command runs: pass storage= a Storage "
                         "(e.g. from deepcontent.engines.context.open_storage(cfg)) or a root URI")
    return Storage.from_config(cfg.storage)


def load_model(version: str | None = None, *, storage: Storage | str | None = None) -> EmbeddingModel:
    """A registered model (default: the production model) with the spectrogram settings it was
    trained on.

    Parameters
    ----------
    version : str, optional
        A model version (``paper_cnn-…``); None = ``models/production.json``.
    storage : Storage or str, optional
        The store whose registry holds it: a :class:`Storage`, or a root URI (``s3://bucket/prefix``
        with the usual AWS credentials, ``file:///…``); None = the configured store.

    Raises
    ------
    InputMissingError
        If nothing is in production or the version is not registered.
    ValueError
        If the model does not read log-mels of the listening factors, or was registered
        without its full spectrogram settings.
    """
    from deepcontent.audio.settings import MelSettings
    from deepcontent.registry import load_model as load_registered
    from deepcontent.registry import production_version

    store = _storage(storage)
    version = version or production_version(store)
    network, artifact = load_registered(store, version)
    if artifact.get("input", "log_mel") != "log_mel":
        raise ValueError(f"model {version} reads {artifact.get('input')}, not log-mel spectrograms")
    spec = artifact.get("spectrograms", {})
    if not spec.get("mel_settings"):
        raise ValueError(f"model {version} was registered without its full spectrogram settings (an older artifact, "
                         f"or clips computed with other settings than its config); re-train it to embed files")
    settings = MelSettings(**spec["mel_settings"])
    if settings.key() != spec.get("settings_key"):
        raise ValueError(f"model {version}: its settings give key {settings.key()}, its clips had {spec.get('settings_key')}")
    return EmbeddingModel(version=version, network=network, artifact=artifact, settings=settings)


def _log_mel(item: Any, settings, storage: Storage | None) -> np.ndarray:
    """One item -> float16 ``(n_mels, n_frames)``, exactly as the spectrogram job stores it."""
    from deepcontent.audio.features import AudioError, _to_float16, compute_log_mel, log_mel, resample

    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], np.ndarray):
        y, sr = item
        y = np.asarray(y, np.float32)
        if y.ndim == 2:  # (n, channels) -> mono, as the decoder downmixes
            y = y.mean(axis=1, dtype=np.float32)
        y = resample(y, orig_sr=int(sr), target_sr=settings.sample_rate)
        if y.size < settings.n_fft:
            raise AudioError("too_short", f"{y.size} samples at {settings.sample_rate} Hz is less than n_fft={settings.n_fft}")
        return _to_float16(log_mel(y, settings=settings))
    if isinstance(item, np.ndarray):
        return _log_mel((item, settings.sample_rate), settings, storage)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, str) and "://" in item:
        if storage is None:
            raise ValueError(f"{item}: a URI needs storage=")
        data = storage.read_bytes(item)
    else:
        data = Path(os.fspath(item)).read_bytes()
    return compute_log_mel(data, settings=settings)["mel"]


def embed_audio(items: Iterable[Any] | Any, *, model: EmbeddingModel | None = None, version: str | None = None,
                storage: Storage | str | None = None, windows_per_forward: int = 256) -> AudioEmbeddings:
    """Predicted factors and embeddings of audio items.

    Parameters
    ----------
    items : iterable
        Each a local path (str or ``os.PathLike``), a URI the storage reads (``s3://``,
        ``file://``), the bytes of an audio file (any codec the decoder reads), a mono or
        ``(n, channels)`` float array at the model's sample rate, or ``(array, sample_rate)``.
    model : EmbeddingModel, optional
        From :func:`load_model`; loaded from ``version`` / ``storage`` when not given.
    windows_per_forward : int
        Windows per forward pass.

    Returns
    -------
    AudioEmbeddings
        Items that fail to decode are left out and listed in ``failures`` with their reason.
    """
    from deepcontent.audio.features import AudioError
    from deepcontent.embed.pooling import clip_outputs

    if isinstance(items, (str, bytes, os.PathLike, np.ndarray, tuple)):
        items = [items]
    store = None if storage is None and model is not None else _storage(storage)
    model = model or load_model(version, storage=store)
    ids, clips, failures = [], [], {}
    for i, item in enumerate(items):
        name = str(item) if isinstance(item, (str, os.PathLike)) else f"item-{i}"
        try:
            clips.append(_log_mel(item, model.settings, store))
            ids.append(name)
        except (AudioError, OSError) as exc:
            failures[name] = f"{getattr(exc, 'reason', type(exc).__name__)}: {exc}"[:300]
    a = model.artifact
    if clips:
        pred, emb = clip_outputs(model.network, clips, n_frames=a["window_frames"], target_mean=a["target_mean"],
                                 target_std=a["target_std"], windows_per_forward=windows_per_forward)
    else:
        pred, emb = np.zeros((0, model.n_factors), np.float32), np.zeros((0, 0), np.float32)
    return AudioEmbeddings(ids=ids, predicted_factors=pred, embeddings=emb, model_version=model.version,
                           failures=failures)


def write_embeddings(result: AudioEmbeddings, out: str, *, storage: Storage | None = None) -> str:
    """``result`` as Parquet (``source, model_version, predicted_factors, embedding`` and one row
    per failure with ``status``/``detail``) at a local path or a storage URI; returns where."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepcontent.datasets import vector_column

    n, failed = len(result.ids), list(result.failures.items())
    dim_f, dim_e = result.predicted_factors.shape[1], result.embeddings.shape[1] if n else 0
    empty = lambda d: np.zeros((len(failed), d), np.float32)  # noqa: E731
    table = pa.table({
        "source": pa.array(result.ids + [k for k, _ in failed], pa.string()),
        "model_version": pa.array([result.model_version] * (n + len(failed)), pa.string()),
        "status": pa.array(["ok"] * n + [v.split(":", 1)[0] for _, v in failed], pa.string()),
        "detail": pa.array([None] * n + [v for _, v in failed], pa.string()),
        "predicted_factors": vector_column(np.vstack([result.predicted_factors, empty(dim_f)])),
        "embedding": vector_column(np.vstack([result.embeddings.reshape(n, dim_e), empty(dim_e)])),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    if "://" in out:
        if storage is None:
            raise ValueError(f"{out}: a URI needs storage=")
        storage.write_bytes(out, buf.getvalue())
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(buf.getvalue())
    return out

