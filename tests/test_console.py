"""The console of the command line: --version, -v, --log-format json, config show, progress bars,
and Spark's and Ray's own output kept in log files unless -v."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-m", "deepcontent.cli"]
SECRET = "Zq8sEcReT-value-4242"


def run(args, cwd, *, env=None, timeout=300):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _file_store(tmp_path, name="store"):
    return [f"storage.root=file://{tmp_path}/{name}", "storage.embedded_s3=false"]


def test_version_names_the_package_and_the_code(tmp_path):
    from importlib.metadata import version

    from deepcontent.code_identity import fingerprint

    out = run(["--version"], tmp_path)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"deepcontent {version('deepcontent')} (code ") and f"sources {fingerprint()}" in line


def test_help_lists_submit_config_and_the_console_options(tmp_path):
    out = run(["--help"], tmp_path)
    assert out.returncode == 0
    for word in ("submit", "config", "--version", "--verbose", "--log-format", "--quiet"):
        assert word in out.stdout, word
    out = run(["ingest", "--help"], tmp_path)
    assert "--verbose" in out.stdout and "--log-format" in out.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_failure_is_one_line_and_verbose_adds_the_traceback(tmp_path, where):
    command = ["rollback", "features/audio_index", *_file_store(tmp_path)]
    plain = run(command, tmp_path)
    assert plain.returncode == 1
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed: StorageError" in lines[0] and "Traceback" not in plain.stderr, plain.stderr

    verbose = run(["-v", *command] if where == "before" else [command[0], "-v", *command[1:]], tmp_path)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr and "storage.py" in verbose.stderr, verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("deepcontent rollback: failed: StorageError")


def test_json_log_lines_parse_and_never_carry_a_secret(tmp_path):
    env = {"AWS_SECRET_ACCESS_KEY": SECRET}
    # the secret in the storage path: every line that names the path must mask it
    store = [f"storage.root=file://{tmp_path}/{SECRET}", "storage.embedded_s3=false"]
    ok = run(["generate", "--log-format", "json", "synth.songs=10", "synth.users=20", "synth.audio=false",
              "synth.gtzan_per_genre=0", "synth.mtat_clips=0", *store], tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    failed = run(["--log-format", "json", "-v", "rollback", "features/audio_index", *store], tmp_path, env=env)
    assert failed.returncode == 1
    records = []
    for out in (ok, failed):
        assert SECRET not in out.stdout + out.stderr
        for line in out.stderr.splitlines():
            record = json.loads(line)  # every line of stderr is one JSON object
            assert {"time", "level", "logger", "message"} <= set(record), record
            records.append(record)
    assert any("generate:" in r["message"] and "***" in r["message"] for r in records)  # the path, masked
    traceback = [r for r in records if "exc_info" in r]
    assert traceback and "Traceback" in traceback[0]["exc_info"] and "***" in traceback[0]["exc_info"]
    assert records[-1]["level"] == "ERROR" and "failed: StorageError" in records[-1]["message"]


def test_config_show_masks_secrets_and_shows_overrides(tmp_path):
    env = {"DEEPCONTENT__STORAGE__SECRET_ACCESS_KEY": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET + "x"}
    out = run(["config", "show", "synth.songs=123", f"warehouse.uri=postgresql+psycopg2://dc:{SECRET}@db/catalog",
               f'spark.conf={{"spark.hadoop.fs.s3a.secret.key": "{SECRET}"}}'], tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["synth"]["songs"] == 123
    assert shown["storage"]["secret_access_key"] == "***"
    assert shown["warehouse"]["uri"] == "postgresql+psycopg2://dc:***@db/catalog"
    assert shown["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"] == "***"
    assert json.loads(run(["config", "show", "--json"], tmp_path).stdout)["synth"]["songs"] != 123


@pytest.fixture
def console_state():
    """Put the ``deepcontent`` logger and the console settings back as they were."""
    from deepcontent import console

    logger = logging.getLogger("deepcontent")
    saved = (list(logger.handlers), logger.level, logger.propagate, console.settings().__dict__.copy())
    yield console
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    console.settings().__dict__.update(saved[3])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, quiet, bar", [(_Terminal, False, True), (io.StringIO, False, False),
                                                (_Terminal, True, False)])
def test_progress_draws_a_bar_only_on_a_terminal(console_state, monkeypatch, stream, quiet, bar):
    from deepcontent.manifest import Progress, log

    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    console_state.configure(quiet=quiet)
    progress = Progress("generate", "clips", 4, every_s=3600)
    for i in range(4):
        if i == 2:
            log.info("a line between two steps")
        progress.update()
    text = err.getvalue()
    drawn = re.search(r"\rgenerate: clips: +\d+%\|", text) is not None
    assert drawn == bar, repr(text)
    if quiet:
        assert text == ""
        return
    # log lines stay whole lines (a bar is cleared for them), and the last step is logged either way
    assert re.search(r"(?:^|\r)\d\d:\d\d:\d\d a line between two steps\n", text, re.M), repr(text)
    assert re.search(r"(?:^|\r)\d\d:\d\d:\d\d generate: clips 4/4 \(100%\), .*\n$", text, re.M), repr(text)


def _run_on_a_terminal(args, cwd, timeout=120) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal (0 x 0, as a bare pty reports);
    returns what it wrote."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(CLI + args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closed: every writer is gone
                    break
                if not chunk:
                    break
                out.extend(chunk)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_generate_draws_bars_on_a_terminal_and_log_lines_elsewhere(tmp_path):
    args = ["generate", "synth.songs=12", "synth.users=40", "synth.clip_seconds=2", "synth.gtzan_per_genre=0",
            "synth.mtat_clips=0"]
    text = _run_on_a_terminal([*args, *_file_store(tmp_path, "tty")], tmp_path)
    assert re.search(r"\rgenerate: catalog clips: +\d+%\|", text), repr(text[-2000:])
    assert "generate: catalog clips 12/12 (100%)" in text  # the last step, logged
    piped = run([*args, *_file_store(tmp_path, "pipe")], tmp_path)
    assert piped.returncode == 0 and "\r" not in piped.stderr and "generate: catalog clips 12/12 (100%)" in piped.stderr


RAY_SCRIPT = """
import sys, time
from deepcontent import console
console.configure(verbose="-v" in sys.argv)
from deepcontent.config import RayConfig
from deepcontent.engines.ray import init_ray
ray = init_ray(RayConfig(num_cpus=1))

@ray.remote
def shout():
    print("WORKER-STDOUT-MARK")
    print("WORKER-STDERR-MARK", file=sys.stderr)
    return 7

assert ray.get(shout.remote()) == 7
time.sleep(2)  # what a worker prints reaches the driver asynchronously
ray.shutdown()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_workers_stay_off_the_console_unless_verbose(tmp_path, verbose):
    script = tmp_path / "ray_script.py"
    script.write_text(RAY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *(["-v"] if verbose else [])], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, DEEPCONTENT_LOG_DIR=str(tmp_path / "logs")))
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    if verbose:
        assert "WORKER-STDOUT-MARK" in console and "WORKER-STDERR-MARK" in console
        assert "logs: Ray" not in console
        return
    assert "WORKER-" not in console and "Started a local Ray instance" not in console, console
    where = re.search(r"logs: Ray driver -> (\S+); Ray workers -> (\S+) ", out.stderr)
    assert where, out.stderr
    assert "Started a local Ray instance" in Path(where.group(1)).read_text()
    worker_logs = "".join(p.read_text(errors="replace") for p in Path(where.group(2)).glob("worker-*"))
    assert "WORKER-STDOUT-MARK" in worker_logs and "WORKER-STDERR-MARK" in worker_logs


HUNG_SHUTDOWN_SCRIPT = """
import os, sys, threading, time
from deepcontent.config import RayConfig
from deepcontent.engines import ray as ray_engine
ray = ray_engine.init_ray(RayConfig(num_cpus=1))
pids = [p.process.pid for ps in ray._private.worker._global_node.all_processes.values() for p in ps]
# Ray's disconnect hanging in the GCS subscriber's Close is not reproducible on demand: this
# stand-in blocks the same way (a call that never returns).
ray.shutdown = lambda *a, **k: threading.Event().wait()
t0 = time.monotonic()
completed = ray_engine.shutdown_ray(timeout_s=2)
print("RESULT", completed, ray_engine.SHUTDOWN_ABANDONED, round(time.monotonic() - t0), flush=True)
time.sleep(1)
alive = []
for pid in pids:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] != "Z":
                alive.append(pid)
    except ProcessLookupError:
        pass
print("ALIVE", alive, flush=True)
from deepcontent.cli import _exit
_exit(3)
"""


def test_a_hung_ray_shutdown_is_abandoned_and_the_command_still_exits(tmp_path):
    script = tmp_path / "hung_shutdown.py"
    script.write_text(HUNG_SHUTDOWN_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 3, out.stderr[-3000:]  # the command's own code, not a hang or a crash
    assert "RESULT False True 2" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "ALIVE []" in out.stdout, out.stdout  # the local GCS, raylet... were stopped directly
    assert "did not return within 2 s" in out.stderr


SPARK_SCRIPT = """
import sys
from deepcontent import console
console.configure(verbose="-v" in sys.argv)
from deepcontent.config import SparkConfig
from deepcontent.engines.spark import spark_session
spark = spark_session(SparkConfig(master="local[1]", driver_memory="1g", shuffle_partitions=1))

def shout(rows):
    print("PYWORKER-STDERR-MARK", file=sys.stderr)
    yield from rows

assert spark.sparkContext.parallelize(range(4), 1).mapPartitions(shout).sum() == 6
try:
    spark.sparkContext.parallelize([1], 1).map(lambda x: x / 0).collect()
except Exception as exc:
    print("task failed as meant:", type(exc).__name__)
spark.stop()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_spark_output_goes_to_its_log_file_unless_verbose(tmp_path, verbose):
    script = tmp_path / "spark_script.py"
    script.write_text(SPARK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *(["-v"] if verbose else [])], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, DEEPCONTENT_LOG_DIR=str(tmp_path / "logs")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "task failed as meant" in out.stdout
    if verbose:  # as before: the JVM's and the workers' own output on the console
        assert "PYWORKER-STDERR-MARK" in out.stderr and "jdk.incubator" in out.stderr
        return
    lines = out.stderr.strip().splitlines()
    assert "PYWORKER" not in out.stderr and "WARN" not in out.stderr and "incubator" not in out.stderr, out.stderr
    assert not [line for line in lines if line.lstrip().startswith("at ")]  # no Java stack trace
    # the failed task: Spark's ERROR lines, one line each, through deepcontent's log format
    assert [line for line in lines if re.match(r"\d\d:\d\d:\d\d spark: ERROR ", line)], out.stderr
    where = re.search(r"logs: Spark -> (\S+) ", out.stderr)
    assert where, out.stderr
    log = Path(where.group(1)).read_text(errors="replace")
    assert "PYWORKER-STDERR-MARK" in log and " INFO SparkContext: Running Spark version" in log
    assert "ZeroDivisionError" in log  # the stack trace is in the file
