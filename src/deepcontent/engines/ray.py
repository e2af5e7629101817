"""Ray init factory. Nothing starts at import.

Local by default (``ray.init()`` on this machine's CPUs); ``ray.address`` in config connects to
a cluster (``ray://head:10001`` or ``auto``)."""

from __future__ import annotations

from deepcontent.config import RayConfig


def init_ray(cfg: RayConfig, *, runtime_env: dict | None = None):
    """Initialise Ray once per process for ``cfg``; returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    kwargs: dict = {"include_dashboard": cfg.include_dashboard, "log_to_driver": True}
    if cfg.address:
        kwargs["address"] = cfg.address
    elif cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    return ray
