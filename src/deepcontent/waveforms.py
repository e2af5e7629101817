"""Mono waveforms of catalog tracks, for the raw-audio CNN (thesis ch. 5).

The raw-audio front end learns its own filterbank, so it reads the decoded audio instead of the
stored log-mels. :func:`publish_waveforms` decodes the tracks' audio (the files the spectrogram
stage indexed in ``features/audio_index``) to mono at ``spectrograms.sample_rate`` and publishes
``features/waveforms`` **in the spectrogram schema**: ``n_mels = 1`` channel, ``n_frames`` =
samples, ``mel`` = float16 PCM, ``hop_length = 1``. The train stage's Ray Data ingest, resident
clip banks and window cropping then work unchanged; a "frame" is a sample and a window of
``train.window_frames`` samples feeds :class:`~deepcontent.models.raw_audio.RawAudioCNN`.

Float16 keeps ~3 significant digits of a sample in [-1, 1] (≈ 66 dB below full scale), below
what the CNN resolves, at half the bytes: 10 s at 22,050 Hz is 441 KB per track.

Decoding runs in this process (it serves the evaluation stage's raw-audio method, a few
thousand tracks at most); a track whose audio no longer decodes is left out and counted, like
in the spectrogram stage. A re-run for the same tracks, audio and rate publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.manifest import log
from deepcontent.spectrograms import AUDIO_INDEX, INDEX_SCHEMA, SHARD_ROW_GROUP, SPECTROGRAM_SCHEMA
from deepcontent.storage import Storage, join, new_run_id

__all__ = ["WAVEFORMS", "publish_waveforms", "waveform"]

WAVEFORMS = "features/waveforms"
_ROWS_PER_SHARD = 64


def waveform(data: bytes, *, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Encoded audio -> mono float16 samples ``(1, n_samples)`` at ``sample_rate``.

    Raises
    ------
    AudioError
        ``reason`` as in :func:`~deepcontent.audio.features.decode_mono` (``undecodable``,
        ``too_long``, ``empty``); ``"undecodable"`` also for NaN / inf samples.
    """
    from deepcontent.audio.features import AudioError, decode_mono, resample

    y, sr = decode_mono(data, max_seconds=max_seconds)
    y = resample(y, orig_sr=sr, target_sr=sample_rate)
    if not np.isfinite(y).all():
        raise AudioError("undecodable", "decoded samples contain NaN or infinity")
    return np.clip(y, -1.0, 1.0).astype(np.float16)[None, :]


def publish_waveforms(cfg: Config, storage: Storage, *, track_ids: list[str]) -> dict:
    """Decode and publish the waveforms of ``track_ids`` (those with indexed, decodable audio).

    Returns
    -------
    dict
        ``{"run_id", "published" (bool: False when the published version already held exactly
        these tracks' current audio), "tracks" (rows published), "left_out" ({track_id: reason})}``.
    """
    sc = cfg.spectrograms
    index = storage.read_published(storage.uri(AUDIO_INDEX), schema=INDEX_SCHEMA)
    index = index.filter(pc.equal(index["status"], "ok")) if index.num_rows else index
    wanted = pa.array(sorted(set(track_ids)), pa.string())
    index = index.filter(pc.is_in(index["track_id"], value_set=wanted))
    rows = sorted(zip(*(index[c].to_pylist() for c in ("track_id", "audio_uri", "audio_sha256"))))
    left_out = {t: "no decoded audio in the spectrogram index" for t in set(wanted.to_pylist()) - {r[0] for r in rows}}
    fingerprint = hashlib.sha256(json.dumps([rows, sc.sample_rate, sc.max_seconds]).encode()).hexdigest()[:24]
    uri = storage.uri(WAVEFORMS)
    current = storage.published(uri)
    if current is not None and current.get("input_fingerprint") == fingerprint:
        log.info("waveforms: %d tracks up to date (run %s)", current.get("tracks", 0), current["run_id"])
        # the decode failures of the run that published, plus what is missing from the index now
        return {"run_id": current["run_id"], "published": False, "tracks": current.get("tracks", 0),
                "left_out": {**current.get("left_out", {}), **left_out}}

    from deepcontent.audio.features import AudioError

    run_id = new_run_id("waveforms")
    staging = storage.staging_uri(uri, run_id)
    files, batch, n, t0 = [], [], 0, time.perf_counter()

    def flush() -> None:
        if batch:
            f = join(staging, f"part-{len(files):05d}.parquet")
            storage.write_parquet(pa.Table.from_pylist(batch, schema=SPECTROGRAM_SCHEMA), f, row_group_size=SHARD_ROW_GROUP)
            files.append(f)
            batch.clear()

    key = f"waveform:sr={sc.sample_rate}"
    for i, (track, audio_uri, sha) in enumerate(rows):
        try:
            y = waveform(storage.read_bytes(audio_uri), sample_rate=sc.sample_rate, max_seconds=sc.max_seconds)
        except (AudioError, OSError) as exc:
            left_out[track] = f"{getattr(exc, 'reason', type(exc).__name__)}: {exc}"[:300]
            log.warning("waveforms: track %s (%s) left out: %s", track, audio_uri, left_out[track])
            continue
        batch.append({"track_id": track, "audio_sha256": sha, "sample_rate": sc.sample_rate, "hop_length": 1,
                      "n_mels": 1, "n_frames": int(y.shape[1]), "mel": y.tobytes(), "harmonic": None, "percussive": None,
                      "settings_key": key})
        n += 1
        if len(batch) == _ROWS_PER_SHARD:
            flush()
        if (i + 1) % 500 == 0:
            log.info("waveforms: %d / %d tracks decoded (%.0f s)", i + 1, len(rows), time.perf_counter() - t0)
    flush()
    if not files:
        raise ValueError(f"waveforms: none of the {len(wanted)} requested tracks has decodable audio "
                         f"({len(left_out)} left out, e.g. {next(iter(left_out.items()), None)})")
    decode_failures = {t: r for t, r in left_out.items() if t in {row[0] for row in rows}}
    storage.publish(uri, run_id=run_id, files=files,
                    meta={"input_fingerprint": fingerprint, "tracks": n, "settings_key": key, "left_out": decode_failures})
    log.info("waveforms: %d tracks published to %s (%d left out) in %.1f s", n, uri, len(left_out),
             time.perf_counter() - t0)
    return {"run_id": run_id, "published": True, "tracks": n, "left_out": left_out}
