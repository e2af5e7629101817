"""A Spark executor killed (SIGKILL) in the middle of the spectrogram stage on a
``local-cluster`` master: Spark reschedules the lost tasks, the stage completes, and what it
published equals a clean run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from reliability.harness import CLI, copy_workdir, digest, ok, overrides

CLUSTER = ["spark.master=local-cluster[2,1,1024]", "spark.executor_memory=700m", "synth.songs=48",
           "spectrograms.clips_per_task=3"]


def _executors() -> list[int]:
    """Executor JVMs, from /proc (their command lines outrun what ps prints)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"CoarseGrainedExecutorBackend" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _run(workdir, *args, killer=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = CLI + [args[0], *overrides(workdir), *CLUSTER, *args[1:]]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if killer:
        threading.Thread(target=killer, args=(proc,), daemon=True).start()
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_an_executor_killed_mid_stage_changes_nothing(tmp_path):
    base = tmp_path
    prep = base / "p0"
    prep.mkdir()
    for stage in ("generate", "ingest"):
        ok(_run(prep, stage, "--json"))
    clean = copy_workdir(prep, base / "c1")
    ok(_run(clean, "spectrograms", "--json"))
    expected = digest(clean)

    hit = copy_workdir(prep, base / "c2")
    killed: list[int] = []
    staged = hit / "store" / "features" / "spectrograms" / "data"

    def kill_one_executor(proc):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if staged.exists() and any(staged.rglob("*.parquet")) and _executors():
                pid = _executors()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    result = _run(hit, "spectrograms", "--json", killer=kill_one_executor)
    assert killed, "no executor was killed while the stage ran"
    summary = ok(result)
    assert summary["counts"]["computed"] == summary["counts"]["tracks_with_audio"]
    got = digest(hit)
    assert got == expected
    print("executor lost and recovered:", killed, file=sys.stderr)
