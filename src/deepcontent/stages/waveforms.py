"""Stage ``waveforms`` (Spark): mono waveforms of the split songs' tracks, for the raw-audio CNN.

The raw-audio front end (thesis ch. 5) learns its own filterbank, so it reads decoded audio
instead of the stored log-mels. This stage decodes, in Spark tasks through the same isolated
decoder as the spectrogram job (:func:`deepcontent.stages.spectrograms.decode_task` with
:func:`~deepcontent.audio.features.compute_waveform`), the audio of every track whose song has
a split (train, valid or test: the songs with plays) and whose audio the spectrogram stage
decoded, and publishes ``features/waveforms`` **in the spectrogram schema**: ``n_mels = 1``
channel, ``n_frames`` = samples, ``mel`` = float16 PCM at ``spectrograms.sample_rate``,
``hop_length = 1``. The train stage's Ray Data ingest, resident clip banks and window cropping
then work unchanged; a "frame" is a sample.

10 s at 22,050 Hz is 441 KB per track, so the pipeline runs this stage only when a model it
trains reads waveforms (``train.input`` or a ``train.variants`` entry such as ``raw_cnn``).

A track whose audio no longer decodes is left out and reported with its reason. A re-run for
the same tracks, audio and rate publishes nothing.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.audio.features import waveform_key
from deepcontent.config import Config
from deepcontent.datasets import AUDIO_INDEX, SPLITS, TRACKS, WAVEFORMS
from deepcontent.errors import TrainingDataError
from deepcontent.manifest import log
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.stages.spectrograms import decode_on_spark

__all__ = ["COMPUTE_FN", "STAGE", "publish_waveforms", "run", "split_tracks"]

STAGE = "waveforms"
COMPUTE_FN = "deepcontent.audio.features:compute_waveform"


def split_tracks(ctx: StageContext) -> list[str]:
    """Tracks whose song has a split (train / valid / test) in ``matrices/splits``."""
    splits = SPLITS.read(ctx.storage, columns=["song_id"])
    tracks = TRACKS.read(ctx.storage, columns=["track_id", "song_id"])
    return tracks.filter(pc.is_in(tracks["song_id"], value_set=splits["song_id"]))["track_id"].to_pylist()


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage for every track of a split song; see the module docstring."""
    out = publish_waveforms(cfg, ctx, track_ids=split_tracks(ctx))
    counts = {"tracks": out["tracks"], "left_out": len(out["left_out"])}
    return out["result"] if out["result"] is not None else StageResult(
        out["run_id"], False, counts, {}, {WAVEFORMS.key: WAVEFORMS.uri(ctx.storage)}, None,
        {"left_out": out["left_out"]})


def publish_waveforms(cfg: Config, ctx: StageContext, *, track_ids: list[str]) -> dict:
    """Decode and publish the waveforms of ``track_ids`` (those with indexed, decodable audio).

    Returns
    -------
    dict
        ``{"run_id", "published" (bool: False when the published version already held exactly
        these tracks' current audio), "tracks" (rows published), "left_out" ({track_id:
        reason}), "result" (the StageResult of a run that published, else None)}``.

    Raises
    ------
    TrainingDataError
        When none of the requested tracks has decodable audio (naming one and why).
    """
    storage, sc = ctx.storage, cfg.spectrograms
    index = AUDIO_INDEX.read_or_empty(storage)
    index = index.filter(pc.equal(index["status"], "ok")) if index.num_rows else index
    wanted = pa.array(sorted(set(track_ids)), pa.string())
    index = index.filter(pc.is_in(index["track_id"], value_set=wanted))
    rows = sorted(zip(*(index[c].to_pylist() for c in ("track_id", "audio_uri", "audio_sha256", "audio_size"))))
    left_out = {t: "no decoded audio in the spectrogram index" for t in set(wanted.to_pylist()) - {r[0] for r in rows}}
    fingerprint = hashlib.sha256(json.dumps([[r[:3] for r in rows], sc.sample_rate, sc.max_seconds]).encode()).hexdigest()[:24]
    current = WAVEFORMS.pointer(storage)
    if current is not None and current.get("input_fingerprint") == fingerprint:
        log.info("waveforms: %d tracks up to date (run %s)", current.get("tracks", 0), current["run_id"])
        # the decode failures of the run that published, plus what is missing from the index now
        return {"run_id": current["run_id"], "published": False, "tracks": current.get("tracks", 0),
                "left_out": {**current.get("left_out", {}), **left_out}, "result": None}
    if not rows:
        raise TrainingDataError(f"waveforms: none of the {len(wanted)} requested tracks has decodable audio "
                                f"({len(left_out)} left out, e.g. {next(iter(left_out.items()), None)})")

    with StageRun(STAGE, cfg, storage, sections=("spectrograms",)) as run:
        run.manifest.inputs = {"audio_index": AUDIO_INDEX.run_id(storage), "tracks_requested": len(wanted),
                               "fingerprint": fingerprint}
        log.info("waveforms: run %s — decoding %d tracks at %d Hz", run.run_id, len(rows), sc.sample_rate)
        with run.timed("decode"):
            results, costs = decode_on_spark(ctx.spark, storage, dataset=WAVEFORMS, compute_fn=COMPUTE_FN,
                                      settings=sc.mel_settings(), settings_key=waveform_key(sc.sample_rate),
                                      sc_cfg=sc, run_id=run.run_id, todo=[(t, u, size, None) for t, u, _, size in rows],
                                      known={})
            run.manifest.timings_s.update(costs)
        failed = results.filter(pc.not_equal(results["status"], "ok"))
        decode_failures = {t: f"{st}: {d}"[:300] for t, st, d in zip(*(failed[c].to_pylist()
                                                                         for c in ("track_id", "status", "detail")))}
        for track, reason in sorted(decode_failures.items()):
            log.warning("waveforms: track %s left out: %s", track, reason)
        files = sorted({s for s in results["shard"].to_pylist() if s})
        n = len(rows) - len(decode_failures)
        if not files:
            raise TrainingDataError(f"waveforms: none of the {len(rows)} indexed tracks decoded "
                                    f"(e.g. {next(iter(decode_failures.items()), None)})")
        run.publish(WAVEFORMS, files, meta={"input_fingerprint": fingerprint, "tracks": n,
                                            "settings_key": waveform_key(sc.sample_rate), "left_out": decode_failures})
        left_out.update(decode_failures)
        result = run.succeed(counts={"tracks": n, "left_out": len(left_out)}, outputs={WAVEFORMS.key: WAVEFORMS.uri(storage)},
                             left_out=left_out)
    log.info("waveforms: %d tracks published (%d left out)", n, len(left_out))
    return {"run_id": run.run_id, "published": True, "tracks": n, "left_out": left_out, "result": result}
