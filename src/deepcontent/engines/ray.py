"""Ray init factory. Nothing starts at import.

Local by default (``ray.init()`` on this machine's CPUs); ``ray.address: auto`` joins the cluster
this process runs on (a Ray job's driver). A cluster's job-submission address
(``http://head:8265``) is not for ``ray.init``: stages reach such a cluster as Ray jobs
(``deepcontent submit``, and the nightly's Ray stages), never as a Ray Client. A ``ray://``
address still connects as a Ray Client, which Ray advises against for ML workloads."""

from __future__ import annotations

from deepcontent.config import RayConfig


def init_ray(cfg: RayConfig, *, runtime_env: dict | None = None):
    """Initialise Ray once per process for ``cfg``; returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    if cfg.address and cfg.address.startswith(("http://", "https://")):
        from deepcontent.errors import ConfigError

        raise ConfigError(f"ray.address {cfg.address!r} is a job-submission address: run this stage on that cluster "
                          f"with `deepcontent submit <stage>` (or `deepcontent nightly`, which submits its Ray "
                          f"stages), or set ray.address=auto inside a job on it")
    kwargs: dict = {"include_dashboard": cfg.include_dashboard, "log_to_driver": True}
    if cfg.address:
        kwargs["address"] = cfg.address
    elif cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    return ray
