"""The per-worker training function (Ray Train) and clip-level prediction.

:func:`train_loop_per_worker` runs on every Ray Train worker:

1. resume: ``ray.train.get_checkpoint()`` gives the latest checkpoint of this run (after a
   worker failure, or when the driver re-runs an interrupted run); training continues from
   the epoch after it with the model, optimiser, early-stopping state and curve it holds;
2. ingest: the worker's Ray Data shards of ``train`` and ``valid`` clips are pulled once, each
   within its share of ``train.cache_bytes`` (:mod:`deepcontent.train.clip_cache`): resident
   :class:`~deepcontent.train.data.ClipBank` s on the training device when they fit (the fast
   path), else spilled to local disk and streamed back a fill at a time every epoch;
3. each epoch: ``steps_per_epoch`` steps (the same on every rank, so DDP's all-reduces pair
   up) of random windows cut from the clips (from each fill, its share of the steps); then
   the validation NMSE of whole-clip predictions (mean over consecutive windows), summed over
   ranks; then one
   ``ray.train.report`` with metrics, and on rank 0 a checkpoint persisted to object storage;
4. early stopping: after ``patience`` epochs without a better validation NMSE (every rank
   sees the same all-reduced numbers, so every rank stops at the same epoch).

Randomness is seeded per (seed, epoch, rank), so a resumed epoch draws the same windows as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import resource
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from deepcontent.config import TrainConfig
from deepcontent.models import MODELS, build_model, consecutive_windows
from deepcontent.train.objectives import make_objective

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["build_regressor", "load_backbone", "model_kwargs", "param_groups", "predict_clips", "train_loop_per_worker"]

CHECKPOINT_FILE = "state.pt"
#: Spill directories are named ``<prefix><pid>-<random>`` (see :func:`_sweep_dead_spills`).
SPILL_PREFIX = "deepcontent-clips-"


def model_kwargs(cfg: TrainConfig, *, n_mels: int) -> dict[str, Any]:
    """Keyword arguments for :func:`deepcontent.models.build_model` (besides ``n_factors``):
    ``cfg.model_params`` plus the band count and, for fixed-window nets, ``window_frames``."""
    params = dict(cfg.model_params)
    accepted = inspect.signature(MODELS[cfg.model].__init__).parameters
    if "n_mels" in accepted:
        params.setdefault("n_mels", n_mels)
    if "n_frames" in accepted:
        params.setdefault("n_frames", cfg.window_frames)
    if "n_samples" in accepted:  # the raw-audio net: a window of window_frames samples
        params.setdefault("n_samples", cfg.window_frames)
    return params


def load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Initialise ``model`` with a pretrained network's weights, every layer but the output
    (a projection in pretraining, the factors here: its size differs and its job too).

    Raises
    ------
    ValueError
        If any other weight is missing or does not fit (another architecture).
    """
    backbone = {k: v for k, v in state.items() if not k.startswith("output.")}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"the pretrained weights do not fit this model: {exc}") from None
    missing = [k for k in missing if not k.startswith("output.")]
    if missing or unexpected:
        raise ValueError(f"the pretrained weights do not fit this model: missing {missing}, unexpected {unexpected}")


def param_groups(model: torch.nn.Module, *, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups: every layer but the output at ``lr × backbone_lr_scale``,
    the output layer (``output.*``, the one :func:`load_backbone` leaves new) at ``lr``.

    One group at ``lr`` when the scale is 1, so a run from scratch optimises exactly as before
    (and its checkpointed optimiser state has the same layout).

    >>> net = torch.nn.ModuleDict({"dense": torch.nn.Linear(4, 3), "output": torch.nn.Linear(3, 2)})
    >>> [(len(g["params"]), g["lr"]) for g in param_groups(net, lr=1e-3, backbone_lr_scale=0.1)]
    [(2, 0.0001), (2, 0.001)]
    """
    if backbone_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    backbone = [p for name, p in model.named_parameters() if not name.startswith("output.")]
    head = [p for name, p in model.named_parameters() if name.startswith("output.")]
    if not head:
        raise ValueError(f"{type(model).__name__} has no output layer (parameters named output.*) to keep at the "
                         f"full learning rate; backbone_lr_scale={backbone_lr_scale} needs one")
    return [{"params": backbone, "lr": lr * backbone_lr_scale}, {"params": head, "lr": lr}]


def build_regressor(name: str, *, n_factors: int, params: dict[str, Any]) -> torch.nn.Module:
    """The registered model ``name`` (a thin alias, so checkpoints and the registry rebuild
    models the same way)."""
    return build_model(name, n_factors=n_factors, **params)


@torch.no_grad()
def predict_clips(
    model: torch.nn.Module,
    clips: Sequence[torch.Tensor],
    *,
    n_frames: int,
    batch_size: int = 256,
    autocast: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """Clip-level predictions: the mean of the model's outputs over consecutive windows.

    Parameters
    ----------
    model : nn.Module
        Already in eval mode, on the clips' device.
    clips : sequence of torch.Tensor [shape=(n_mels, n_frames_i)]
        Whole clips (any length; shorter than a window = one zero-padded window).
    n_frames : int
        Window length. Windows are back to back, plus one ending at the clip's last frame when
        the regular ones stop short (so every frame is seen; thesis §4.5.2).
    batch_size : int
        Windows per forward pass (several clips share a batch).
    autocast : callable, optional
        Returns the forward-pass context (bf16 autocast on GPU).

    Returns
    -------
    pred : torch.Tensor [shape=(n_clips, n_factors), dtype=float32]
    """
    if not len(clips):
        raise ValueError("predict_clips got no clips")
    windows = [consecutive_windows(c, n_frames=n_frames, cover_tail=True) for c in clips]
    counts = torch.as_tensor([w.shape[0] for w in windows])
    owner = torch.repeat_interleave(torch.arange(len(clips)), counts)
    flat = torch.cat(windows)
    outs = []
    for s in range(0, flat.shape[0], batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            outs.append(model(flat[s : s + batch_size]).float())
    out = torch.cat(outs)
    sums = torch.zeros((len(clips), out.shape[1]), dtype=out.dtype, device=out.device)
    sums.index_add_(0, owner.to(out.device), out)
    return sums / counts.to(out.device, out.dtype)[:, None]


# ----------------------------------------------------------------------------- helpers
def _seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over all ranks (identity on one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _resolve_hook(path: str | None) -> Callable | None:
    if not path:
        return None
    from deepcontent.hooks import resolve_hook

    return resolve_hook(path, field="train.epoch_hook")


def _epoch_order(n_clips: int, n_needed: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Clip indices for one epoch: whole random permutations of the local clips, concatenated
    until ``n_needed`` are drawn (every clip is visited equally often, up to the remainder)."""
    reps = -(-n_needed // n_clips)
    perms = [torch.randperm(n_clips, generator=generator, device=device) for _ in range(reps)]
    return torch.cat(perms)[:n_needed]


def _load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point; ``config`` is built by :func:`deepcontent.stages.train.train_model`.

    Keys: ``train`` (TrainConfig as a dict), ``backend`` (:class:`~deepcontent.train.backend.Backend`),
    ``n_factors``, ``n_mels``, ``steps_per_epoch``, ``valid_variance``, ``target_mean`` /
    ``target_std`` (lists), ``wpe`` (an object ref of ``(item_users CSR, user_factors)`` or None),
    ``cache`` (``{"train": bytes, "valid": bytes}``: this worker's clip budgets,
    :func:`~deepcontent.train.clip_cache.cache_budgets`).
    """
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    cfg = TrainConfig(**config["train"])
    backend = config["backend"]
    torch.set_num_threads(backend.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    n_factors, n_mels = config["n_factors"], config["n_mels"]  # the net's outputs, the clips' bands
    n_targets = config.get("n_targets", n_factors)  # the width of each clip's target
    steps, batch = config["steps_per_epoch"], cfg.batch_size
    hook = _resolve_hook(cfg.epoch_hook)

    state = _load_state(ray.train.get_checkpoint())
    attempt = 0 if state is None else state["attempt"] + 1
    start_epoch = 0 if state is None else state["epoch"] + 1
    history: list[dict] = [] if state is None else list(state["history"])
    best_score = float("inf") if state is None else state["best_score"]
    best_epoch = -1 if state is None else state["best_epoch"]
    best_state = None if state is None else state["best_state"]
    bad_epochs = 0 if state is None else state["bad_epochs"]
    if state is not None and state["stopped"]:
        return  # the run had already finished (a driver re-run of a completed run)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_regressor(cfg.model, n_factors=n_factors, params=model_kwargs(cfg, n_mels=n_mels))
    if state is not None:
        model.load_state_dict(state["model"])
    elif config.get("init_state") is not None:  # a fresh run from a pretrained network
        load_backbone(model, ray.get(config["init_state"]))
    # to the device, DDP when world > 1; gradients live in the all-reduce buckets (one copy fewer)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    # DDP wraps the net; validation and checkpoints use the bare module (no collectives)
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    pretrained = config.get("init_state") is not None
    opt = torch.optim.Adam(param_groups(base, lr=cfg.lr, backbone_lr_scale=cfg.init_lr_scale if pretrained else 1.0),
                           lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])

    _sweep_dead_spills(cfg.spill_dir or tempfile.gettempdir())
    spill_dir = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=cfg.spill_dir)
    clips: dict = {}
    try:
        t0 = time.perf_counter()
        clips = _load_shards(config["cache"], cfg=cfg, spill_dir=spill_dir, n_factors=n_targets, n_mels=n_mels,
                             device=device, backend=backend)
        train_clips, valid_clips = clips["train"], clips["valid"]
        load_s = time.perf_counter() - t0
        if len(train_clips) == 0:
            raise RuntimeError(f"train worker {rank} of {world} received no train clips; "
                               f"use fewer train.num_workers (now {world}) or more train songs")
        cache = {"train": train_clips.mode, "valid": valid_clips.mode, "budget_bytes": cfg.cache_bytes,
                 "clip_bytes_held": train_clips.held_bytes + valid_clips.held_bytes}
        objective = make_objective(cfg, config, device=device, autocast=lambda: backend.autocast(device))

        for epoch in range(start_epoch, cfg.epochs):
            gen = torch.Generator(device=device).manual_seed(_seed(cfg.seed, epoch, rank))
            t_epoch = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            # One fill when the shard is resident (the draws of a plain bank); else a fill at a
            # time, the row groups in an order of their own seed (the window draws keep `gen`).
            for bank, fill_steps in train_clips.epoch_fills(steps=steps, seed=_seed(cfg.seed + 1, epoch, rank)):
                order = _epoch_order(len(bank), fill_steps * batch, gen, device)
                for step in range(fill_steps):
                    loss = objective.loss(model, bank, order[step * batch : (step + 1) * batch], gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach()  # no host sync per step
            train_s = time.perf_counter() - t_epoch

            base.eval()
            loss_total, *sums = _all_reduce_sum([float(loss_sum), *objective.validate(base, valid_clips)], device)
            peak_rss = _all_reduce_max(_peak_rss_bytes(), device)
            train_loss = loss_total / (steps * world)
            valid = objective.summary(sums)
            score = valid[objective.metric]  # what early stopping follows (lower is better)

            if score < best_score:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
            else:
                bad_epochs += 1
            stopped = bad_epochs >= cfg.patience or epoch == cfg.epochs - 1
            epoch_s = time.perf_counter() - t_epoch
            samples = steps * batch * world
            entry = {
                "epoch": epoch, "train_loss": train_loss, **valid, f"best_{objective.metric}": best_score,
                "best_epoch": best_epoch, "attempt": attempt, "attempt_start_epoch": start_epoch, "samples": samples,
                "train_s": round(train_s, 4), "epoch_s": round(epoch_s, 4),
                "samples_per_s": samples / train_s if train_s > 0 else float("nan"),
                "load_s": round(load_s, 4) if epoch == start_epoch else 0.0,
                "worker_elapsed_s": round(time.perf_counter() - t_start, 4),
                "cache": cache, "worker_peak_rss_bytes": int(peak_rss), "worker_rss_parts_bytes": _rss_parts(),
            }
            history.append(entry)
            metrics = {**entry, "stopped": stopped}
            if rank == 0:
                saved = {"epoch": epoch, "attempt": attempt, "model": base.state_dict(), "optimizer": opt.state_dict(),
                         "best_state": best_state, "best_score": best_score, "best_epoch": best_epoch,
                         "bad_epochs": bad_epochs, "history": copy.deepcopy(history), "stopped": stopped}
                with tempfile.TemporaryDirectory() as d:
                    torch.save(saved, os.path.join(d, CHECKPOINT_FILE))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=f"epoch-{epoch:04d}-attempt-{attempt}")
            else:
                ray.train.report(metrics)
            if hook is not None:
                hook(epoch=epoch, rank=rank, attempt=attempt)
            if stopped:
                break
    finally:
        for c in clips.values():
            c.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def _load_shards(budgets: dict[str, int], *, cfg: TrainConfig, spill_dir: str, n_factors: int, n_mels: int,
                 device: torch.device, backend) -> dict:
    """This worker's Ray Data shards of ``train`` and ``valid`` as clips on ``device``, each
    within its share of ``train.cache_bytes`` (:func:`~deepcontent.train.clip_cache.load_clips`).

    One shard after the other, the smaller ``valid`` first: two streams at once held two
    loading buffers and two sets of in-flight blocks (measured: a higher peak RSS and no faster
    a load, bench_train_cache). ``get_dataset_shard`` is a barrier across ranks, so it stays on
    this thread, in order. The object-store pages the blocks were read from are released from
    this worker's resident set as the load goes (:func:`_releasing_store_pages`)."""
    import ray.train

    from deepcontent.train.clip_cache import load_clips

    def load(shard, split: str):
        batches = shard.iter_batches(batch_size=64, batch_format="pyarrow", prefetch_batches=cfg.prefetch_batches)
        clips = load_clips(_releasing_store_pages(batches), budget_bytes=budgets[split],
                           spill_path=os.path.join(spill_dir, f"{split}.parquet"), min_frames=cfg.window_frames,
                           n_factors=n_factors, n_mels=n_mels)
        return clips.to(device, move=backend.to_device)

    train_shard, valid_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("valid")
    valid = load(valid_shard, "valid")
    return {"train": load(train_shard, "train"), "valid": valid}


#: Bytes of batches a worker reads between two releases of its object-store pages.
RELEASE_EVERY_BYTES = 64 * 2**20


def _releasing_store_pages(batches: Iterable[pa.Table], *, every_bytes: int = RELEASE_EVERY_BYTES) -> Iterator[pa.Table]:
    """``batches`` unchanged, releasing this process's object-store pages
    (:func:`~deepcontent.engines.ray.release_object_store_pages`) after every ``every_bytes``
    of them and at the end. Without it a worker's RSS holds every store page its blocks ever
    occupied (0.3-0.37 GiB for a 1 GiB shard, bench_train_cache), on top of its clip budget."""
    from deepcontent.engines.ray import release_object_store_pages

    seen = 0
    for batch in batches:
        yield batch
        seen += batch.nbytes
        if seen >= every_bytes:
            release_object_store_pages()
            seen = 0
    release_object_store_pages()


def _sweep_dead_spills(root: str) -> None:
    """Remove spill directories whose worker process is gone (a SIGKILLed worker cannot clean
    up; its replacement on the same host does). Another live worker's directory is kept."""
    if not os.path.isdir("/proc"):  # no way to tell a live pid here: leave them
        return
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(SPILL_PREFIX):
            continue
        pid = name[len(SPILL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_parts() -> dict[str, int]:
    """This process's resident set now, by kind (Linux ``/proc/self/status``): ``anon``
    (private: torch, clips, Arrow buffers), ``file`` (mapped libraries) and ``shmem`` (shared
    memory touched, e.g. Ray's object store pages read through); empty elsewhere."""
    parts = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    parts[key[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return parts


def _all_reduce_max(value: float, device: torch.device) -> float:
    """The largest value over all ranks (identity on one worker)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())
