"""Ray init factory. Nothing starts at import.

Local by default (``ray.init()`` on this machine's CPUs); ``ray.address: auto`` joins the cluster
this process runs on (a Ray job's driver). A cluster's job-submission address
(``http://head:8265``) is not for ``ray.init``: stages reach such a cluster as Ray jobs
(``deepcontent submit``, and the nightly's Ray stages), never as a Ray Client. A ``ray://``
address still connects as a Ray Client, which Ray advises against for ML workloads.

Under the CLI without ``-v`` (:func:`deepcontent.console.engines_quiet`) Ray keeps to its log
files: workers' stdout / stderr are not forwarded to the driver (``log_to_driver=False`` unless
``ray.log_to_driver``), the driver's ``ray`` and ``ray.data`` loggers write to
``ray-driver.log`` in :func:`deepcontent.console.engine_log_dir` with only errors on the
console, and Ray Data draws no progress bars."""

from __future__ import annotations

from deepcontent import console
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
    quiet = console.engines_quiet()
    # Inside a Ray job (address "auto") the driver's output *is* the job's log, where the
    # workers' lines belong; on a user's console they are noise unless -v.
    log_to_driver = cfg.log_to_driver if cfg.log_to_driver is not None else (not quiet or cfg.address == "auto")
    kwargs: dict = {"include_dashboard": cfg.include_dashboard, "log_to_driver": log_to_driver}
    if cfg.address:
        kwargs["address"] = cfg.address
    elif cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if quiet:
        import ray.data  # its logger is configured on import: take it off the console after that

        for name in ("ray", "ray.data"):
            console.route_to_files(name, "ray-driver.log")
        ray.data.DataContext.get_current().enable_progress_bars = False
    ray.init(**kwargs)
    if quiet:
        workers = "" if log_to_driver else " (not shown here; -v shows them)"
        console.announce("ray", f"Ray driver -> {console.engine_log_dir() / 'ray-driver.log'}; "
                                f"Ray workers -> {_session_logs(ray)}{workers}")
    return ray


def _session_logs(ray) -> str:
    """Where this Ray session's worker logs are (``/tmp/ray/session_*/logs`` on a local instance)."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # no public accessor
    except Exception:  # noqa: BLE001 - a Ray Client has no local node
        return "the Ray session's logs folder on each node"


#: Set when :func:`shutdown_ray` gave up waiting: the process should end with ``os._exit``
#: (interpreter finalisation would wait on the same stuck call). The CLI checks it.
SHUTDOWN_ABANDONED = False


def shutdown_ray(*, timeout_s: float = 15.0) -> bool:
    """``ray.shutdown()``, bounded by ``timeout_s``; returns whether it completed.

    Ray 2.60's driver disconnect can block for ever in the GCS subscriber's ``Close`` (a gRPC
    call without a deadline that the GCS does not answer; seen at the end of every full pipeline
    run here, with all work done and committed). A command whose work is finished must not hang
    on it (a healthy shutdown takes about 1.5 s), so the shutdown runs in a thread; past the
    deadline this stops the local Ray processes that ``ray.init`` started (what the shutdown
    would have done next), takes Ray's own exit hook off (it would block on the same call), and
    sets :data:`SHUTDOWN_ABANDONED`.
    """
    import atexit
    import logging
    import threading

    import ray

    global SHUTDOWN_ABANDONED
    done = threading.Event()

    def stop() -> None:
        try:
            ray.shutdown()
        finally:
            done.set()

    threading.Thread(target=stop, name="ray-shutdown", daemon=True).start()
    if done.wait(timeout_s):
        return True
    logging.getLogger(__name__).warning(
        "ray.shutdown() did not return within %.0f s (the driver's GCS subscriber never closed); "
        "stopping the local Ray processes directly", timeout_s)
    atexit.unregister(ray.shutdown)
    node = getattr(ray._private.worker, "_global_node", None)  # no public handle on the local node
    if node is not None:
        try:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
        except Exception as exc:  # noqa: BLE001 - best effort; Ray's reaper also ends them with us
            logging.getLogger(__name__).warning("could not stop the local Ray processes: %s", exc)
    SHUTDOWN_ABANDONED = True
    return False


#: File names of the shared-memory files Ray's object store maps into every worker
#: (``/dev/shm/plasmaXXXXXX``, or the same name under its fallback directory).
OBJECT_STORE_FILE_PREFIX = "plasma"
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def release_object_store_pages(*, maps_path: str = "/proc/self/maps", prefix: str = OBJECT_STORE_FILE_PREFIX) -> int:
    """Drop this process's page-table entries for the object store's shared memory; returns
    the bytes of mappings released (0 where there is nothing to release or no Linux).

    A worker keeps every object-store page it ever read a block from in its resident set: the
    store's file is mapped whole into each worker, and a page stays mapped once touched. Those
    pages are the store's memory (shared, budgeted by ``object_store_memory``, counted once by
    the machine), but they make the worker's RSS — what memory monitors and limits watch —
    grow with how much data streamed through it. ``madvise(MADV_DONTNEED)`` on a *shared* file
    mapping only unmaps: the data stays in the store's file, and a later read of an object maps
    its pages again. So this is safe at any time, also while blocks are referenced; private
    mappings are never touched.
    """
    import ctypes
    import ctypes.util

    try:
        with open(maps_path) as f:
            lines = f.readlines()
    except OSError:
        return 0
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[1].endswith("s"):  # shared mappings only
            continue
        path = parts[5].strip()  # may end in " (deleted)": the store can unlink its file once mapped
        if not path.rsplit("/", 1)[-1].startswith(prefix):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        spans.append((start, end - start))
    if not spans:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, length in spans:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) == 0:
            released += length
    return released
