"""The model registry in object storage: versions, artifacts, and the production pointer.

Layout under the storage root::

    models/<model_version>/model.pt     torch.save of the model artifact (below)
    models/<model_version>/model.json   metrics, training curve, inputs, code version;
                                        written after model.pt: its presence = registered
    models/production.json              pointer to the latest promoted version
    models/variants/<name>.json         pointer to the latest version of a named variant
                                        (cnn_wpe, raw_cnn, ...: the evaluation's models)
    models/_history/<ms>-<version>.json every production pointer ever written, oldest first

A ``model_version`` is ``<model name>-<16 hex>``, a hash of the training config (minus purely
operational settings), the data snapshot (the run ids of every input dataset) and the code
version, so the same inputs + config + code always name the same version, and a re-run finds
it registered and trains nothing.

The artifact is a plain dict (no pickled classes), readable without Ray::

    {"format": 1, "model_version", "model": name, "model_params": {...}, "n_factors", "n_mels",
     "window_frames", "target_mean": [f], "target_std": [f], "state_dict": {...},
     "spectrograms": {"settings_key", "sample_rate", "hop_length", "n_mels", "compression"},
     "train_config": {...}}
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import torch

from deepcontent.config import Config
from deepcontent.errors import InputMissingError
from deepcontent.storage import Storage, join, safe_key

__all__ = ["PRODUCTION", "load_model", "model_version", "production_version", "register", "registered",
           "variant_pointer", "version_uri"]

REGISTRY = "models"
PRODUCTION = f"{REGISTRY}/production.json"
ARTIFACT_FORMAT = 1

#: Train settings that change how a run executes but not which model it learns. (``cache_bytes``
#: is not one: a shard beyond it is drawn a fill at a time, so the windows each step sees differ.)
OPERATIONAL = frozenset({"max_failures", "checkpoints_to_keep", "epoch_hook", "prefetch_batches", "cpus_per_worker",
                         "eval_batch_size", "baseline", "baseline_words", "ingest_cpus",
                         "ingest_concurrency", "variants", "variant", "spill_dir"})


def model_version(cfg: Config, *, inputs: dict[str, str], code: str) -> str:
    """``<model>-<16 hex>`` from the train config (operational keys excluded, and
    ``init_lr_scale`` where it changes nothing), the factorize and spectrogram config
    fingerprints, the input run ids and the code version."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in OPERATIONAL}
    if not cfg.train.init_from or cfg.train.init_lr_scale == 1.0:
        # a setting of fine-tuning only: a run from scratch, or at one rate, learns the same model
        train.pop("init_lr_scale")
    blob = json.dumps({"train": train, "factorize": cfg.fingerprint("factorize"),
                       "spectrograms": cfg.fingerprint("spectrograms"), "inputs": dict(sorted(inputs.items())),
                       "code": code}, sort_keys=True, default=str)
    return f"{cfg.train.model}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def version_uri(storage: Storage, version: str, name: str = "") -> str:
    """URI of ``models/<version>/`` or of a file in it."""
    return storage.uri(REGISTRY, safe_key(version), name) if name else storage.uri(REGISTRY, safe_key(version))


def registered(storage: Storage, version: str) -> dict | None:
    """The ``model.json`` of ``version``, or None if it is not registered."""
    uri = version_uri(storage, version, "model.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def _pointer(storage: Storage, version: str, metadata: dict[str, Any]) -> dict:
    return {"model_version": version, "model_uri": version_uri(storage, version, "model.pt"),
            "metadata_uri": version_uri(storage, version, "model.json"),
            "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "valid_nmse": metadata.get("metrics", {}).get("valid_nmse"), "inputs": metadata.get("inputs", {})}


def register(storage: Storage, *, version: str, artifact: dict[str, Any], metadata: dict[str, Any],
             promote: bool = True, variant: str | None = None) -> dict:
    """Write ``model.pt``, then ``model.json``, then (``promote``) point ``models/production.json``
    at it and (``variant``) ``models/variants/<variant>.json``.

    Returns the version's pointer. A crash between the writes leaves at most an unregistered
    ``model.pt`` that the next run overwrites. Evaluation variants (another loss, another
    architecture) register without promotion, under their variant name."""
    buf = io.BytesIO()
    torch.save(artifact, buf)
    storage.write_bytes(version_uri(storage, version, "model.pt"), buf.getvalue())
    storage.write_json(version_uri(storage, version, "model.json"),
                       {**metadata, "model_version": version, "model_uri": version_uri(storage, version, "model.pt")})
    pointer = _pointer(storage, version, metadata)
    if promote:
        storage.write_json(join(storage.uri(REGISTRY), "_history", f"{int(time.time() * 1000):015d}-{safe_key(version)}.json"), pointer)
        storage.write_json(storage.uri(PRODUCTION), pointer)
    if variant is not None:
        point_variant(storage, variant, version=version)
    return pointer


def point_variant(storage: Storage, variant: str, *, version: str) -> dict:
    """Point ``models/variants/<variant>.json`` at the registered ``version``."""
    metadata = registered(storage, version)
    if metadata is None:
        raise InputMissingError(f"model version {version!r} is not registered; cannot name it variant {variant!r}")
    pointer = {**_pointer(storage, version, metadata), "variant": variant}
    storage.write_json(storage.uri(REGISTRY, "variants", f"{safe_key(variant)}.json"), pointer)
    return pointer


def variant_pointer(storage: Storage, variant: str) -> dict | None:
    """The pointer of a named variant (``model_version``, ``inputs``, ...), or None."""
    uri = storage.uri(REGISTRY, "variants", f"{safe_key(variant)}.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def model_registry(cfg: Config, storage: Storage) -> Storage:
    """Where models are loaded from: ``embed.registry_root`` (another catalog's root on the same
    store, so a model trained there can embed an audio-only catalog here) or the storage itself."""
    root = cfg.embed.registry_root
    return storage.with_root(root) if root else storage


def production_version(storage: Storage) -> str:
    """The production model version (``models/production.json``)."""
    uri = storage.uri(PRODUCTION)
    if not storage.exists(uri):
        raise InputMissingError(f"no model in production: {uri} does not exist; run `deepcontent train` first")
    return storage.read_json(uri)["model_version"]


def load_model(storage: Storage, version: str | None = None, *, map_location: str | torch.device = "cpu"):
    """``(model in eval mode, artifact dict)`` for ``version`` (default: production).

    Raises
    ------
    FileNotFoundError
        If no version is given and nothing is in production, or the version is not registered.
    """
    from deepcontent.train.loop import build_regressor

    if version is None:
        version = production_version(storage)
    if registered(storage, version) is None:
        raise InputMissingError(f"model version {version!r} is not registered under {version_uri(storage, version)}")
    artifact = torch.load(io.BytesIO(storage.read_bytes(version_uri(storage, version, "model.pt"))),
                          map_location=map_location, weights_only=True)
    if artifact.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"model {version!r} has artifact format {artifact.get('format')!r}; this code reads {ARTIFACT_FORMAT}")
    model = build_regressor(artifact["model"], n_factors=artifact["n_factors"], params=artifact["model_params"])
    model.load_state_dict(artifact["state_dict"])
    return model.eval(), artifact
