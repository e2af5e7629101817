"""Where the hardware choice lives: one place turns ``train.use_gpu`` / ``train.precision`` into
everything that differs between a CPU and a GPU run, so the training loop has no ``if gpu``.

=================  ==========================  ===============================
                   CPU (``use_gpu: false``)      GPU (``use_gpu: true``)
=================  ==========================  ===============================
process group      gloo                        NCCL
autocast           off (fp32)                  bf16 (``precision: auto``)
host memory        pageable                    pinned (async copies to device)
intra-op threads   ``threads_per_worker``      ``threads_per_worker``
=================  ==========================  ===============================

The device itself comes from Ray Train (``ray.train.torch.get_device()``: the worker's GPU, or
the CPU), so the same code also runs on a machine without any accelerator.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from deepcontent.config import TrainConfig

__all__ = ["Backend", "resolve_backend"]


@dataclass(frozen=True)
class Backend:
    """Hardware settings of a run (picklable; travels to the workers in the loop config).

    Attributes
    ----------
    torch_backend : {"gloo", "nccl"}
        ``torch.distributed`` backend for DDP.
    use_gpu : bool
        One GPU per Ray Train worker.
    autocast_dtype : str or None
        ``"bfloat16"`` to run forward passes under ``torch.autocast``; None for fp32.
    pin_memory : bool
        Stage host tensors in pinned memory before copying them to the device.
    threads : int
        ``torch.set_num_threads`` per worker.
    """

    torch_backend: str
    use_gpu: bool
    autocast_dtype: str | None
    pin_memory: bool
    threads: int

    def autocast(self, device: torch.device):
        """The forward-pass context: bf16 autocast on the device, or a no-op for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=getattr(torch, self.autocast_dtype))

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a host tensor to ``device`` (through pinned memory, asynchronously, on GPU)."""
        if self.pin_memory and device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)


def resolve_backend(cfg: TrainConfig) -> Backend:
    """The :class:`Backend` for a train config.

    Raises
    ------
    ValueError
        For ``precision="bf16"`` without a GPU: CPU bf16 convolutions are slower than fp32 and
        would change results silently, so the combination is refused rather than honoured.
    """
    gpu = bool(cfg.use_gpu)
    if cfg.precision == "bf16" and not gpu:
        raise ValueError("train.precision='bf16' needs train.use_gpu=true; use 'auto' or 'fp32' on CPU")
    autocast = "bfloat16" if gpu and cfg.precision in ("auto", "bf16") else None
    return Backend(torch_backend="nccl" if gpu else "gloo", use_gpu=gpu, autocast_dtype=autocast, pin_memory=gpu,
                   threads=cfg.threads_per_worker)
