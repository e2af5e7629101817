"""Scale rehearsal of the publish side: embed -> neighbors -> publish, then a nightly, at N and N/4.

    python tests/benchmarks/scale_publish.py [--tracks 200000] [--json]
                                             [--n-mels 16] [--clip-frames 128] [--window 60]

No audio: for each size it writes synthetic float16 log-mel shards straight into a fresh
``file://`` deployment (published as ``features/spectrograms``, ``--shard-clips`` clips a
shard), registers a paper CNN for those settings (random weights: the work is the same), then

1. **full run**: the ``embed`` stage (Ray Data actors, every clip pending, one commit), the
   ``neighbors`` stage (exact up to ``neighbors.exact_max_tracks``, HNSW beyond, recall@10
   measured on 2,000 exact queries) and ``maintain``;
2. **nightly**: 1% of the tracks get new audio (a new shard with new hashes) and 1% are new
   tracks; the ``nightly`` stage runs ``embed -> neighbors -> maintain`` on them.

It prints per-stage seconds, the driver's peak RSS and the whole process tree's peak RSS
(driver + Ray workers, sampled every 0.5 s), and:

* ``embed_ratio``: embed clips/s of the full run's inference phase over the model's
  forward-only clips/s (``forward_clips_per_s``: ``deepcontent.embed.pooling.clip_outputs`` on
  the same clips in memory, batched as the actors batch them, in ``embed.actors`` processes of
  ``embed.threads_per_actor`` torch threads running together, as the actors run), same run.
  ``forward_one_process_clips_per_s`` is the earlier reference (one process with all the
  threads, per-clip arrays, ``clips_per_batch`` clips a call), printed for comparison only: a
  small CNN splits poorly across intra-op threads, so it understated the cores and flattered
  the ratio;
* ``nightly_ratio``: nightly seconds / full-run seconds;
* ``growth_exponent``: the worst stage's log(t_N / t_{N/4}) / log 4 (1 = linear).

The last line of output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa


class TreeRSS:
    """Peak RSS of this process and its descendants, sampled from ``/proc``."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.peak, self._stop, self.every_s = 0, threading.Event(), every_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> dict[int, int]:
        parents = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        return parents

    def _rss(self) -> int:
        parents, tree, frontier = self._children(), {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            for c, pp in parents.items():
                if pp == p and c not in tree:
                    tree.add(c)
                    frontier.append(c)
        total = 0
        for pid in tree:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_shards(storage, *, first: int, n: int, audio: str, n_mels: int, frames: int, shard_clips: int, run: str,
                 seed: int) -> list[str]:
    from deepcontent.datasets import SPECTROGRAM_SCHEMA, SPECTROGRAMS

    rng = np.random.default_rng(seed)
    files = []
    for s in range(first, first + n, shard_clips):
        m = min(first + n, s + shard_clips) - s
        mels = rng.standard_normal((m, n_mels, frames), dtype=np.float32).astype(np.float16)
        ids = np.arange(s, s + m)
        t = pa.table({
            "track_id": [f"TR{i:09d}" for i in ids], "audio_sha256": [f"{audio}-{i}" for i in ids],
            "sample_rate": pa.array([22050] * m, pa.int32()), "hop_length": pa.array([512] * m, pa.int32()),
            "n_mels": pa.array([n_mels] * m, pa.int32()), "n_frames": pa.array([frames] * m, pa.int32()),
            "mel": pa.array([mels[i].tobytes() for i in range(m)], pa.binary()),
            "harmonic": pa.nulls(m, pa.binary()), "percussive": pa.nulls(m, pa.binary()),
            "settings_key": ["bench"] * m}, schema=SPECTROGRAM_SCHEMA)
        uri = storage.uri(SPECTROGRAMS.key, "data", run, f"part-{s:09d}.parquet")
        storage.write_parquet(t, uri, row_group_size=256)
        files.append(uri)
    return files


def register_model(storage, *, n_mels: int, window: int, factors: int = 50) -> str:
    import torch

    from deepcontent.models.factory import build_model
    from deepcontent.registry import ARTIFACT_FORMAT, register

    torch.manual_seed(0)
    params = {"n_mels": n_mels, "n_frames": window}
    model = build_model("paper_cnn", n_factors=factors, **params)
    version = "paper_cnn-scale"
    artifact = {"format": ARTIFACT_FORMAT, "model_version": version, "model": "paper_cnn", "model_params": params,
                "n_factors": factors, "n_mels": n_mels, "window_frames": window, "target_mean": [0.0] * factors,
                "target_std": [1.0] * factors, "state_dict": model.state_dict(), "spectrograms": {"settings_key": "bench"}}
    register(storage, version=version, artifact=artifact, metadata={"metrics": {}}, promote=True)
    return version


def _reference_batches(storage, items: list[tuple[str, list[int]]], *, clips_per_batch: int) -> list[list[np.ndarray]]:
    """The clips of ``items`` (shard, row groups) in memory, grouped as a ``ClipEmbedder`` groups
    them: whole row groups until at least ``clips_per_batch`` clips, as float16 blocks."""
    from deepcontent.datasets import mel_blocks
    from deepcontent.embed.inference import CLIP_COLUMNS

    batches, held, n = [], [], 0
    for uri, groups in items:
        for _, t in storage.read_row_groups(uri, groups, columns=CLIP_COLUMNS):
            held += [b.copy() for b in mel_blocks(t)]
            n += t.num_rows
            if n >= clips_per_batch:
                batches.append(held)
                held, n = [], 0
    if held:
        batches.append(held)
    return batches


def _forward_worker(storage, version: str, items, threads: int, clips_per_batch: int, windows_per_forward: int,
                    barrier, results) -> None:
    """One reference process: its clips into memory, a warm-up batch, then (all processes
    together, after ``barrier``) the model over every batch; puts ``(start, end, clips)``."""
    import torch

    from deepcontent.embed.inference import retain_freed_memory
    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.registry import load_model

    torch.set_num_threads(threads)
    retain_freed_memory()  # as a ClipEmbedder does: a fresh process is otherwise a third slower
    model, artifact = load_model(storage, version)
    model.eval()
    batches = _reference_batches(storage, items, clips_per_batch=clips_per_batch)
    kw = {"n_frames": artifact["window_frames"], "target_mean": artifact["target_mean"],
          "target_std": artifact["target_std"], "windows_per_forward": windows_per_forward}
    with torch.no_grad():
        clip_outputs(model, batches[0], **kw)  # warm-up: allocator, kernels
        barrier.wait()
        t0 = time.perf_counter()
        for b in batches:
            clip_outputs(model, b, **kw)
        results.put((t0, time.perf_counter(), sum(x.shape[0] for b in batches for x in b)))


def forward_clips_per_s(storage, version: str, files: list[str], *, clips: int, cfg) -> float:
    """The model alone on the first ``clips`` clips, already in memory, laid out as the embed
    stage runs: ``embed.actors`` processes of ``embed.threads_per_actor`` torch threads each,
    started together, each pooling whole row groups of at least ``embed.clips_per_batch`` clips
    per :func:`clip_outputs` call with ``embed.windows_per_forward`` windows per pass.

    Clips/s = all clips / (last process's end - first one's start). One process with all the
    threads is not the same work: a small CNN splits poorly across intra-op threads, so it
    understates what the actors' cores can do (see :func:`forward_one_process_clips_per_s`)."""
    import multiprocessing as mp

    import pyarrow.parquet as pq

    ec = cfg.embed
    groups: list[tuple[str, int]] = []
    n = 0
    for f in files:
        with storage.open_input(f) as fh:
            meta = pq.ParquetFile(fh).metadata
        for g in range(meta.num_row_groups):
            if n >= clips:
                break
            groups.append((f, g))
            n += meta.row_group(g).num_rows
    shares: list[list[tuple[str, list[int]]]] = [[] for _ in range(ec.actors)]
    for i, (f, g) in enumerate(groups):  # row groups dealt round-robin, as Ray Data spreads items
        share = shares[i % ec.actors]
        if share and share[-1][0] == f:
            share[-1][1].append(g)
        else:
            share.append((f, [g]))
    shares = [s for s in shares if s]
    ctx = mp.get_context("spawn")  # no fork after Ray and torch threads started
    barrier, results = ctx.Barrier(len(shares)), ctx.Queue()
    procs = [ctx.Process(target=_forward_worker, args=(storage, version, share, ec.threads_per_actor, ec.clips_per_batch,
                                                       ec.windows_per_forward, barrier, results)) for share in shares]
    for p in procs:
        p.start()
    done = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(c for _, _, c in done) / (max(e for _, e, _ in done) - min(s for s, _, _ in done))


def forward_one_process_clips_per_s(storage, version: str, files: list[str], *, threads: int, clips: int, cfg) -> float:
    """The earlier reference, for comparison only: one process with ``threads`` torch threads,
    one array per clip, ``embed.clips_per_batch`` clips per :func:`clip_outputs` call."""
    import torch

    from deepcontent.datasets import mel_arrays
    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.registry import load_model

    model, artifact = load_model(storage, version)
    model.eval()
    mels = []
    for f in files:
        mels.extend(m.copy() for m in mel_arrays(storage.read_parquet(f, columns=["track_id", "n_mels", "n_frames", "mel"])))
        if len(mels) >= clips:
            break
    mels = mels[:clips]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    kw = {"n_frames": artifact["window_frames"], "target_mean": artifact["target_mean"],
          "target_std": artifact["target_std"], "windows_per_forward": cfg.embed.windows_per_forward}
    step = cfg.embed.clips_per_batch
    try:
        with torch.no_grad():
            clip_outputs(model, mels[:step], **kw)  # warm-up
            t0 = time.perf_counter()
            for s in range(0, len(mels), step):
                clip_outputs(model, mels[s:s + step], **kw)
            return len(mels) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def rehearse(n: int, args) -> dict:
    from deepcontent.config import load_config
    from deepcontent.datasets import SPECTROGRAMS
    from deepcontent.stages import run_stage
    from deepcontent.storage import Storage

    out: dict = {"tracks": n}
    with tempfile.TemporaryDirectory(prefix="scale-publish-") as root:
        storage = Storage(f"file://{root}/store")
        storage.ensure_root()
        cfg = load_config(None, environ={}, overrides=[
            f"storage.root={storage.root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{root}/catalog.db",
            "storage.sweep_grace_s=0", f"embed.actors={args.actors}", "neighbors.k=10",
            "nightly.stages=[embed,neighbors,maintain]"])
        files = write_shards(storage, first=0, n=n, audio="a", n_mels=args.n_mels, frames=args.clip_frames,
                             shard_clips=args.shard_clips, run="r0", seed=0)
        storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r0", files=files)
        version = register_model(storage, n_mels=args.n_mels, window=args.window)
        stages: dict[str, float] = {}
        with TreeRSS() as tree, _Context(cfg, storage) as ctx:
            ctx.ensure_ray()  # engines started before any clock, as one nightly process shares them
            t_full = time.perf_counter()
            for name in ("embed", "neighbors", "maintain"):
                t0 = time.perf_counter()
                result = run_stage(name, cfg, ctx)
                stages[name] = round(time.perf_counter() - t0, 2)
                if name == "embed":
                    manifest = storage.read_json(result.manifest_uri)
                    out["embed_inference_s"] = manifest["timings_s"].get("inference")
                    out["embed_seconds"] = manifest["timings_s"]
                if name == "neighbors":
                    out["neighbors_index"] = storage.read_json(result.manifest_uri)["index"]
            full_s = time.perf_counter() - t_full

            # the nightly: 1% with new audio, 1% new tracks
            k = max(1, n // 100)
            changed = write_shards(storage, first=0, n=k, audio="b", n_mels=args.n_mels, frames=args.clip_frames,
                                   shard_clips=args.shard_clips, run="r1", seed=1)
            new = write_shards(storage, first=n, n=k, audio="a", n_mels=args.n_mels, frames=args.clip_frames,
                               shard_clips=args.shard_clips, run="r1", seed=2)
            # The changed tracks' old shard rows are superseded: the published set holds the new ones.
            storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r1", files=files + changed + new)
            t0 = time.perf_counter()
            nightly = run_stage("nightly", cfg, ctx)
            nightly_s = time.perf_counter() - t0
            out["nightly_timings_s"] = {s: storage.read_json(v["manifest"]).get("timings_s")
                                        for s, v in nightly.details["stages"].items() if v.get("manifest")}
            out["forward_clips_per_s"] = forward_clips_per_s(storage, version, files, clips=min(n, args.forward_clips),
                                                             cfg=cfg)
            out["forward_one_process_clips_per_s"] = forward_one_process_clips_per_s(
                storage, version, files, threads=args.actors * cfg.embed.threads_per_actor,
                clips=min(n, args.forward_clips), cfg=cfg)
        out.update({"stages_full_s": stages, "full_s": round(full_s, 2), "nightly_s": round(nightly_s, 2),
                    "nightly_stages_s": {s: v["seconds"] for s, v in nightly.details["stages"].items()},
                    "nightly_new": nightly.details["new"], "nightly_changed": nightly.details["changed"],
                    "peak_rss_tree_gib": round(tree.peak / 2**30, 2)})
        out["embed_clips_per_s"] = n / out["embed_inference_s"]
        out["embed_ratio"] = round(out["embed_clips_per_s"] / out["forward_clips_per_s"], 3)
    return out


class _Context:
    """A StageContext on ``storage`` that stops its engines on exit."""

    def __init__(self, cfg, storage):
        from deepcontent.stages import StageContext

        self.ctx = StageContext(cfg, storage)

    def __enter__(self):
        return self.ctx

    def __exit__(self, *exc):
        self.ctx.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracks", type=int, default=200_000)
    p.add_argument("--n-mels", type=int, default=16)
    p.add_argument("--clip-frames", type=int, default=128, help="frames per synthetic clip")
    p.add_argument("--window", type=int, default=60, help="the model's window (frames)")
    p.add_argument("--shard-clips", type=int, default=4096)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--forward-clips", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    quarter = rehearse(max(8, args.tracks // 4), args)
    full = rehearse(args.tracks, args)
    growth = {}
    for stage in full["stages_full_s"]:
        a, b = quarter["stages_full_s"][stage], full["stages_full_s"][stage]
        if a > 0.5:  # below half a second a stage's time is fixed cost and noise
            growth[stage] = round(math.log(b / a) / math.log(4), 3)
    result = {
        "tracks": args.tracks, "stages_full_s": full["stages_full_s"], "full_s": full["full_s"],
        "nightly_s": full["nightly_s"], "nightly_stages_s": full["nightly_stages_s"],
        "nightly_timings_s": full["nightly_timings_s"],
        "nightly_ratio": round(full["nightly_s"] / full["full_s"], 4),
        "embed_ratio": full["embed_ratio"], "embed_clips_per_s": round(full["embed_clips_per_s"], 1),
        "forward_clips_per_s": round(full["forward_clips_per_s"], 1),
        "forward_one_process_clips_per_s": round(full["forward_one_process_clips_per_s"], 1),
        "neighbors_recall_at_10": full["neighbors_index"].get("recall_at_k"),
        "neighbors_method": full["neighbors_index"]["method"],
        "growth_exponent": max(growth.values()) if growth else None, "growth_by_stage": growth,
        "peak_rss_driver_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_rss_tree_gib": max(full["peak_rss_tree_gib"], quarter["peak_rss_tree_gib"]),
        "quarter": {k: quarter[k] for k in ("tracks", "stages_full_s", "full_s", "nightly_s", "embed_ratio")},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
