"""The GPU checks behind ``tests/gpu/run_gpu_checks.sh`` (never in the default run).

    python tests/gpu/gpu_checks.py [--device cuda|cpu] [--clips 2048] [--seconds 10]
                                   [--train-steps 300] [--embed-clips 512] [--plan] [--smoke]

On one machine, with the project's own code paths:

1. **catalog**: ``--clips`` learnable synthetic log-mel clips of ``--seconds`` (128 bands; each
   song's spectral envelope is a function of a latent vector that also gives its factors), split
   90/10 into train and valid;
2. **train**: the paper CNN regressing the factors with the train stage's GPU settings
   (:func:`deepcontent.train.backend.resolve_backend` with ``train.use_gpu=true``: bf16 autocast,
   pinned host memory), DDP with one process per GPU over NCCL (gloo on the CPU), clips resident
   on the device (:mod:`deepcontent.train.clip_cache`), random windows cut there every step —
   the train loop's step. With Ray installed, the same through the real train stage (Ray Train,
   ``train.use_gpu=true``) is run instead (``--path auto``);
3. **input-bound?**: the same steps on windows cut once in advance (compute only); training is
   input-bound when the full step reaches less than 80% of that rate;
4. **GPU utilisation**: ``nvidia-smi`` sampled every 200 ms during training (mean, max, memory);
5. **embed**: ``deepcontent.embed.pooling.clip_outputs`` of the trained model on the GPU (bf16,
   as ``embed.use_gpu=true`` runs it) and on the CPU (fp32) for ``--embed-clips`` clips: clips/s
   on each and their agreement (cosine of the embeddings, largest difference of the predicted
   factors relative to their spread).

Prints one JSON line last. ``--plan`` prints what it would do and exits; ``--smoke`` shrinks
everything for a CPU run in seconds (what the default tests run, to keep the script working).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "src"))

N_MELS, LATENT, FACTORS = 128, 8, 16


def log(msg: str) -> None:
    print(f"[gpu_checks {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- catalog
def synthetic_catalog(*, clips: int, frames: int, seed: int = 0) -> dict:
    """``{"mels": (n, 128, frames) float16, "factors": (n, 16) float32}``: each clip a spectral
    envelope of a latent vector z with frame-level noise, its factors a linear map of z plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.cumsum(rng.standard_normal((LATENT, N_MELS)), axis=1) / np.sqrt(N_MELS)
    z = rng.standard_normal((clips, LATENT))
    envelope = np.log1p(np.exp(z @ basis)).astype(np.float32)
    mels = np.empty((clips, N_MELS, frames), np.float16)
    for s in range(0, clips, 256):  # in chunks: no float32 copy of the whole catalog
        e = envelope[s:s + 256]
        noise = rng.standard_normal((len(e), N_MELS, frames), dtype=np.float32)
        mels[s:s + 256] = (e[:, :, None] * (1.0 + 0.5 * noise)).astype(np.float16)
    factors = (z @ rng.standard_normal((LATENT, FACTORS)) + 0.5 * rng.standard_normal((clips, FACTORS)))
    return {"mels": mels, "factors": factors.astype(np.float32)}


def clip_batches(mels: np.ndarray, targets: np.ndarray, rows: np.ndarray, *, per: int = 64):
    """Rows of the catalog as the Arrow batches a train worker receives from Ray Data."""
    import pyarrow as pa

    from deepcontent.datasets import vector_column

    for s in range(0, len(rows), per):
        r = rows[s:s + per]
        yield pa.table({"track_id": [f"TR{i:08d}" for i in r], "n_mels": pa.array([N_MELS] * len(r), pa.int32()),
                        "n_frames": pa.array([mels.shape[2]] * len(r), pa.int32()),
                        "mel": pa.array([mels[i].tobytes() for i in r], pa.binary()),
                        "target": vector_column(targets[r]), "item_idx": pa.array(r.astype(np.int32))})


# ----------------------------------------------------------------------------- GPU sampling
class GpuSampler:
    """``nvidia-smi`` utilisation and memory, sampled every ``every_ms`` in the background."""

    def __init__(self, every_ms: int = 200) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc = None
        self._thread = None
        self.every_ms = every_ms

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={self.every_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_max_mib": None, "gpu_samples": 0}
        u = np.asarray([s[0] for s in self.samples])
        return {"gpu_util_mean": round(float(u.mean()), 1), "gpu_util_max": float(u.max()),
                "gpu_mem_max_mib": float(max(s[1] for s in self.samples)), "gpu_samples": len(self.samples)}


# ----------------------------------------------------------------------------- train (one rank)
def _train_rank(rank: int, world: int, port: int, args, data_path: str, out_path: str) -> None:
    """One DDP rank: the train loop's step on resident clips, then the same on pre-cut windows."""
    import torch
    import torch.distributed as dist

    from deepcontent.config import TrainConfig
    from deepcontent.models import build_model
    from deepcontent.train.backend import resolve_backend
    from deepcontent.train.clip_cache import load_clips
    from deepcontent.train.losses import mse_loss

    use_gpu = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tc = TrainConfig(use_gpu=use_gpu, batch_size=args.batch_size, threads_per_worker=args.threads)
    backend = resolve_backend(tc)
    dist.init_process_group(backend.torch_backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(backend.threads)

    data = np.load(data_path)
    mels, factors = data["mels"], data["factors"]
    train_rows = np.flatnonzero(np.arange(len(mels)) % 10 != 0)[rank::world]
    clips = load_clips(clip_batches(mels, factors, train_rows), budget_bytes=None, spill_path=None,
                       min_frames=tc.window_frames, n_factors=FACTORS, n_mels=N_MELS)
    bank = clips.bank.to(device, move=backend.to_device)
    torch.manual_seed(0)
    model = build_model("paper_cnn", n_factors=FACTORS, n_mels=N_MELS, n_frames=tc.window_frames).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if use_gpu else None,
                                                    gradient_as_bucket_view=True)
    opt = torch.optim.Adam(ddp.parameters(), lr=tc.lr)
    gen = torch.Generator(device=device).manual_seed(rank)
    batch = tc.batch_size

    def sync():
        if use_gpu:
            torch.cuda.synchronize(device)

    def step(x, y):
        with backend.autocast(device):
            pred = ddp(x)
        loss = mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def full_step():
        idx = torch.randint(0, len(bank), (batch,), generator=gen, device=device)
        return step(bank.random_windows(idx, n_frames=tc.window_frames, generator=gen), bank.targets[idx])

    for _ in range(5):  # warm-up: kernels, allocator, NCCL
        full_step()
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        loss = full_step()
    sync()
    dist.barrier()
    full_s = time.perf_counter() - t0

    # compute only: the same steps on windows cut once in advance
    idx = torch.randint(0, len(bank), (batch,), generator=gen, device=device)
    x_fixed = bank.random_windows(idx, n_frames=tc.window_frames, generator=gen).contiguous()
    y_fixed = bank.targets[idx]
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step(x_fixed, y_fixed)
    sync()
    dist.barrier()
    compute_s = time.perf_counter() - t0
    if rank == 0:
        torch.save({"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "full_s": full_s, "compute_s": compute_s, "final_loss": float(loss.detach()),
                    "samples": args.train_steps * batch * world, "window": tc.window_frames,
                    "precision": backend.autocast_dtype or "fp32", "process_group": backend.torch_backend}, out_path)
    dist.destroy_process_group()


def train_torch_ddp(args, data_path: str, workdir: str) -> dict:
    """DDP over ``torch.multiprocessing`` (one process per GPU), the train loop's step."""
    import socket

    import torch
    import torch.multiprocessing as mp

    world = max(1, torch.cuda.device_count()) if args.device == "cuda" else 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_path = os.path.join(workdir, "trained.pt")
    with GpuSampler() as sampler:
        mp.start_processes(_train_rank, args=(world, port, args, data_path, out_path), nprocs=world, join=True,
                           start_method="spawn")
    r = torch.load(out_path, weights_only=False)
    full = r["samples"] / r["full_s"]
    compute = r["samples"] / r["compute_s"]
    return {"path": "torch-ddp", "world_size": world, "process_group": r["process_group"], "precision": r["precision"],
            "train_samples_per_s": round(full, 1), "compute_only_samples_per_s": round(compute, 1),
            "input_bound": bool(full < 0.8 * compute), "train_steps": args.train_steps,
            "final_train_loss": round(r["final_loss"], 4), **sampler.summary(),
            "_state": r["state"], "_window": r["window"]}


# ----------------------------------------------------------------------------- embed
def embed_agreement(state: dict, window: int, mels: np.ndarray, *, device: str, clips: int) -> dict:
    """The trained model's clip outputs on ``device`` (bf16 on a GPU, as embed.use_gpu runs) and
    on the CPU (fp32): clips/s of each and how far they agree."""
    import torch

    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.models import build_model

    model = build_model("paper_cnn", n_factors=FACTORS, n_mels=N_MELS, n_frames=window)
    model.load_state_dict(state)
    model.eval()
    sample = [mels[i] for i in range(min(clips, len(mels)))]
    kw = {"n_frames": window, "target_mean": np.zeros(FACTORS), "target_std": np.ones(FACTORS)}

    def timed(dev, autocast):
        m = model.to(dev)
        clip_outputs(m, sample[:8], device=dev, autocast=autocast, **kw)  # warm-up
        if dev != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pred, emb = clip_outputs(m, sample, device=dev, autocast=autocast, windows_per_forward=256, **kw)
        return pred, emb, len(sample) / (time.perf_counter() - t0)

    pred_cpu, emb_cpu, cpu_rate = timed("cpu", None)
    out = {"embed_clips": len(sample), "embed_clips_per_s_cpu": round(cpu_rate, 1)}
    if device == "cuda":
        bf16 = lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)  # noqa: E731
        pred_gpu, emb_gpu, gpu_rate = timed("cuda", bf16)
        out["embed_clips_per_s_gpu"] = round(gpu_rate, 1)
    else:  # the CPU smoke run compares the CPU with itself: the check's plumbing, not a GPU
        pred_gpu, emb_gpu = pred_cpu, emb_cpu
        out["embed_clips_per_s_gpu"] = None
    cos = (emb_cpu * emb_gpu).sum(1) / (np.linalg.norm(emb_cpu, axis=1) * np.linalg.norm(emb_gpu, axis=1) + 1e-12)
    spread = pred_cpu.std(axis=0).mean() + 1e-12
    out["agreement"] = {"embedding_cosine_min": round(float(cos.min()), 5),
                        "embedding_cosine_mean": round(float(cos.mean()), 5),
                        "factors_max_abs_diff_over_sd": round(float(np.abs(pred_cpu - pred_gpu).max() / spread), 5)}
    # bf16 forward passes differ from fp32 in the 3rd significant digit; far beyond that is a bug
    out["agreement"]["ok"] = bool(cos.min() > 0.99 and out["agreement"]["factors_max_abs_diff_over_sd"] < 0.1)
    return out


# ----------------------------------------------------------------------------- main
PLAN = """\
GPU checks (device={device}, path={path}):
  1. catalog : {clips} synthetic learnable clips × {seconds} s, 128 bands (float16), 90% train / 10% held out
  2. train   : paper CNN, train.use_gpu=true settings (bf16 autocast, pinned memory), DDP one process per GPU
               over NCCL ({steps} steps of batch {batch} per rank), clips resident on the device
  3. input   : the same steps on pre-cut windows: input-bound when the full step is < 80% of that rate
  4. nvidia-smi sampled every 200 ms while training (utilisation mean / max, memory)
  5. embed   : clip_outputs of the trained model, GPU bf16 vs CPU fp32 on {embed} clips: clips/s, agreement
  -> one JSON line"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--path", choices=("auto", "torch-ddp"), default="auto",
                    help="auto: the train stage on Ray Train when Ray is installed, else torch-ddp")
    ap.add_argument("--clips", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4, help="torch threads per rank")
    ap.add_argument("--embed-clips", type=int, default=512)
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU run in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clips, args.seconds, args.train_steps, args.batch_size, args.embed_clips = 48, 4.0, 3, 8, 8
        args.threads = 1
    path = args.path
    if path == "auto":
        try:
            import ray  # noqa: F401

            path = "ray-train"
        except ImportError:
            path = "torch-ddp"
    print(PLAN.format(device=args.device, path=path, clips=args.clips, seconds=args.seconds, steps=args.train_steps,
                      batch=args.batch_size, embed=args.embed_clips), file=sys.stderr)
    if args.plan:
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to torch", "torch": torch.__version__}))
        return 2
    t_start = time.perf_counter()
    frames = 1 + int(args.seconds * 22050) // 512
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as work:
        log(f"catalog: {args.clips} clips of {frames} frames")
        cat = synthetic_catalog(clips=args.clips, frames=frames)
        data_path = os.path.join(work, "catalog.npz")
        np.savez(data_path, **cat)
        if path == "ray-train":
            from ray_path import train_ray  # the real train stage; only where Ray is installed

            result = train_ray(args, cat, work)
        else:
            log("train: torch DDP, one process per GPU")
            result = train_torch_ddp(args, data_path, work)
        log("embed: GPU vs CPU")
        held_out = cat["mels"][np.arange(len(cat["mels"])) % 10 == 0]
        result.update(embed_agreement(result.pop("_state"), result.pop("_window"), held_out, device=args.device,
                                      clips=args.embed_clips))
    result.update({"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                   "torch": torch.__version__, "clips": args.clips, "clip_frames": frames,
                   "wall_s": round(time.perf_counter() - t_start, 1)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
