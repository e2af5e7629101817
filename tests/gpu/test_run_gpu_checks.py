"""The GPU check script stays runnable without a GPU: its dry run parses itself, compiles its
driver and prints the plan, and the driver's whole path runs on the CPU at smoke size (the GPU
numbers themselves come from running it on a GPU machine; see the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GPU = Path(__file__).resolve().parent


def test_the_dry_run_checks_its_syntax_and_prints_the_plan():
    out = subprocess.run([str(GPU / "run_gpu_checks.sh"), "--dry-run", "--python", sys.executable], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "plan (dry run" in text and "NCCL" in text and "bf16" in text and "nvidia-smi" in text, text
    bad = subprocess.run([str(GPU / "run_gpu_checks.sh"), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_the_checks_run_end_to_end_on_the_cpu_at_smoke_size():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(GPU / "gpu_checks.py"), "--device", "cpu", "--smoke", "--path", "torch-ddp"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path"] == "torch-ddp" and result["process_group"] == "gloo" and result["world_size"] == 1
    assert result["train_samples_per_s"] > 0 and result["compute_only_samples_per_s"] > 0
    assert isinstance(result["input_bound"], bool) and result["agreement"]["ok"]
    assert result["gpu_util_mean"] is None  # no nvidia-smi here: reported as missing, not invented
