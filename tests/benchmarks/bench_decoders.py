"""Benchmark: the ffmpeg fallback decoder (PyAV) vs libsndfile on the same clips, one thread.

    python tests/benchmarks/bench_decoders.py [--clips 30] [--seconds 30] [--json]

Renders ``--clips`` synthetic songs (44.1 kHz stereo) and encodes each as MP3, Ogg Vorbis, FLAC
and WAV. For every format both decoders of :func:`deepcontent.audio.features.decode_mono` decode
the same bytes, interleaved clip by clip after a warm-up: libsndfile (the primary path) and
ffmpeg through PyAV (the fallback that reads what libsndfile does not: AAC / M4A, ALAC, ...).
Reported per format: median wall ms per clip of each, ``ffmpeg_over_libsndfile`` (above 1 = the
fallback is slower) and the RMS difference of the two decodes (same samples, up to each codec's
decoder delay). AAC in M4A, which only ffmpeg reads, is timed on its own. The last line of
output is the JSON result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catalog_files import ffmpeg_bytes, libsndfile_bytes, music  # noqa: E402

from deepcontent.audio.features import _decode_mono_ffmpeg, decode_mono  # noqa: E402
from deepcontent.synth.audio import encode_audio  # noqa: E402


def _encode(y: np.ndarray, fmt: str) -> bytes:
    if fmt == "mp3":
        return encode_audio(y, sample_rate=44100, fmt="mp3")
    if fmt == "m4a_aac":
        return ffmpeg_bytes(y, 44100, container="ipod", codec="aac")
    container, subtype = {"ogg": ("OGG", "VORBIS"), "flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}[fmt]
    return libsndfile_bytes(y, 44100, container, subtype)


def _ms(fn, data) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    y, _ = fn(data)
    return (time.perf_counter() - t) * 1e3, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=30)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lib = lambda d: decode_mono(d, max_seconds=3600)  # noqa: E731
    ff = lambda d: _decode_mono_ffmpeg(d, max_seconds=3600, min_decoded_fraction=0.0, libsndfile="bench")  # noqa: E731
    clips = [music(i, seconds=args.seconds) for i in range(args.clips)]
    out = {"clips": args.clips, "seconds": args.seconds, "formats": {}}
    for fmt in ("mp3", "ogg", "flac", "wav"):
        data = [_encode(y, fmt) for y in clips]
        lib(data[0]), ff(data[0])  # warm-up
        t_lib, t_ff, diff = [], [], []
        for d in data:
            a, ya = _ms(lib, d)
            b, yb = _ms(ff, d)
            t_lib.append(a)
            t_ff.append(b)
            n = min(len(ya), len(yb))
            diff.append(float(np.sqrt(np.mean((ya[:n] - yb[:n]) ** 2))))
        out["formats"][fmt] = {"libsndfile_ms_per_clip": round(float(np.median(t_lib)), 2),
                               "ffmpeg_ms_per_clip": round(float(np.median(t_ff)), 2),
                               "ffmpeg_over_libsndfile": round(float(np.median(t_ff) / np.median(t_lib)), 3),
                               "rms_difference": float(f"{np.median(diff):.3g}")}
        print(f"{fmt}: {out['formats'][fmt]}", file=sys.stderr)
    data = [_encode(y, "m4a_aac") for y in clips]
    ff(data[0])
    out["formats"]["m4a_aac"] = {"ffmpeg_ms_per_clip": round(float(np.median([_ms(ff, d)[0] for d in data])), 2)}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
