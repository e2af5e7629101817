"""Benchmark: the log-mel pipeline (``compute_log_mel``) vs the naive librosa path, one thread.

    python tests/benchmarks/bench_features.py [--clips 50] [--seconds 30] [--json]

Renders ``--clips`` synthetic songs (genres round-robin) with ``render_clip`` at 44.1 kHz
stereo and encodes them as 128 kbit/s MP3 into a temp dir, then, in the same process with one
BLAS/OpenMP thread and one FFT worker, measures per clip (each clip's bytes already in memory,
the two paths interleaved clip by clip after one warm-up clip each):

* ``inprocess_ms_per_clip``: ``compute_log_mel(bytes)`` end to end (decode, downmix, checks,
  resample, STFT + mel + log, float16, SHA-256);
* ``naive_ms_per_clip``: ``naive_log_mel(bytes)`` (``librosa.load`` + ``melspectrogram`` +
  ``log1p``);
* ``ratio_vs_naive`` = inprocess / naive (below 1 = the pipeline is faster);
* ``stage_ms``: the pipeline's stages timed separately on the same clips (decode + downmix,
  resample, log-mel, float16 + hash).

Per-clip figures are medians of wall time over clips (robust to other processes on a shared
machine); the means, and medians of this process's CPU time (``*_cpu_ms_per_clip``, less
sensitive to a busy machine), are reported too. The last line of output is the JSON result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread per worker process, set before numpy loads BLAS

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from deepcontent.audio.features import (  # noqa: E402
    MelSettings,
    compute_log_mel,
    decode_mono,
    log_mel,
    naive_log_mel,
    resample,
)
from deepcontent.synth.attributes import GENRES, sample_attributes  # noqa: E402
from deepcontent.synth.audio import encode_audio, render_clip  # noqa: E402


def render_clips(directory: Path, n: int, seconds: float, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        attrs = sample_attributes(GENRES[i % len(GENRES)], rng)
        audio = render_clip(attrs, seconds=seconds, sample_rate=44100, seed=seed * 100_003 + i)
        path = directory / f"clip{i:04d}.mp3"
        path.write_bytes(encode_audio(audio, sample_rate=44100, fmt="mp3"))
        paths.append(path)
    return paths


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json", action="store_true", help="print only progress on stderr and the JSON result")
    args = ap.parse_args()
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    settings = MelSettings()

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        t0 = time.perf_counter()
        paths = render_clips(Path(tmp), args.clips, args.seconds)
        blobs = [p.read_bytes() for p in paths]
        say(f"rendered + encoded {len(blobs)} clips of {args.seconds:g} s in {_ms(t0) / 1e3:.1f} s "
            f"(mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB)")

        # Warm-up: imports, filterbank construction, FFT plans.
        compute_log_mel(blobs[0], settings=settings)
        naive_log_mel(blobs[0], settings=settings)

        fast, naive, fast_cpu, naive_cpu = [], [], [], []
        stages: dict[str, list[float]] = {"decode_downmix": [], "resample": [], "log_mel": [], "float16_sha256": []}
        for data in blobs:
            c0, t0 = time.process_time(), time.perf_counter()
            out = compute_log_mel(data, settings=settings)
            fast.append(_ms(t0))
            fast_cpu.append((time.process_time() - c0) * 1e3)
            c0, t0 = time.process_time(), time.perf_counter()
            ref = naive_log_mel(data, settings=settings)
            naive.append(_ms(t0))
            naive_cpu.append((time.process_time() - c0) * 1e3)
            assert ref.shape == out["mel"].shape, (ref.shape, out["mel"].shape)

            t0 = time.perf_counter()
            y, sr = decode_mono(data, max_seconds=settings.max_seconds)
            stages["decode_downmix"].append(_ms(t0))
            t0 = time.perf_counter()
            y = resample(y, orig_sr=sr, target_sr=settings.sample_rate)
            stages["resample"].append(_ms(t0))
            t0 = time.perf_counter()
            mel = log_mel(y, settings=settings)
            stages["log_mel"].append(_ms(t0))
            t0 = time.perf_counter()
            mel.astype(np.float16)
            hashlib.sha256(data).hexdigest()
            stages["float16_sha256"].append(_ms(t0))

    stage_ms = {k: round(float(np.median(v)), 2) for k, v in stages.items()}
    say(f"pipeline stages (median ms/clip): {json.dumps(stage_ms)}")
    result = {
        "clips": len(blobs),
        "inprocess_ms_per_clip": round(float(np.median(fast)), 2),
        "naive_ms_per_clip": round(float(np.median(naive)), 2),
        "ratio_vs_naive": round(float(np.median(fast) / np.median(naive)), 3),
        "inprocess_mean_ms": round(float(np.mean(fast)), 2),
        "naive_mean_ms": round(float(np.mean(naive)), 2),
        "inprocess_cpu_ms_per_clip": round(float(np.median(fast_cpu)), 2),
        "naive_cpu_ms_per_clip": round(float(np.median(naive_cpu)), 2),
        "stage_ms": stage_ms,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
