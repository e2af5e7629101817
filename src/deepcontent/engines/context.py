"""Where a command's storage comes from: the configured store, or the embedded S3 server.

With ``storage.embedded_s3`` the command starts ``rclone serve s3`` over
``storage.embedded_s3_dir`` with credentials generated for this run, and stops it on exit.
Everything else (stages, tests) only ever sees a :class:`~deepcontent.storage.Storage`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deepcontent.config import Config
from deepcontent.manifest import log
from deepcontent.storage import Storage


@contextmanager
def open_storage(cfg: Config) -> Iterator[Storage]:
    """Yield the run's :class:`Storage` (root created), serving it locally when configured."""
    if not cfg.storage.embedded_s3:
        storage = Storage.from_config(cfg.storage)
        storage.ensure_root()
        yield storage
        return
    if not cfg.storage.root.startswith("s3://"):
        raise ValueError(f"storage.embedded_s3 needs an s3:// root, got {cfg.storage.root!r}")
    from deepcontent.engines.s3server import EmbeddedS3Server

    data_dir = Path(cfg.storage.embedded_s3_dir)
    log_file = data_dir.parent / "s3server.log"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with EmbeddedS3Server(data_dir, log_file=str(log_file)) as server:
        log.info("storage: embedded S3 server at %s serving %s", server.endpoint_url, data_dir.resolve())
        from deepcontent.redact import register_secret

        register_secret(server.credentials.secret_access_key)  # masked wherever it might surface
        storage = Storage(cfg.storage.root, endpoint_url=server.endpoint_url, region=cfg.storage.region,
                          credentials=server.credentials, sweep_grace_s=cfg.storage.sweep_grace_s,
                          lock_lease_s=cfg.storage.lock_lease_s)
        storage.ensure_root()
        yield storage
