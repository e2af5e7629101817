"""Scale run: Taste-Profile-size plays through generate -> ingest -> matrices -> factorize.

    python tests/benchmarks/scale_taste_profile.py [--users 1019318 --songs 384546] [--workdir DIR] [--json]

Each stage runs as its own ``deepcontent`` command (as an operator would run them) on the
embedded default (local Spark, local S3 server, SQLite Iceberg catalog) in ``--workdir``. For
each stage it reports wall time and the peak resident memory of the stage's whole process tree
(driver, JVM, Python workers, S3 server), sampled every 0.2 s from /proc. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TASTE_USERS, TASTE_SONGS, TASTE_LINES = 1_019_318, 384_546, 48_373_586


def _tree_rss_bytes(root: int) -> int:
    """Sum of RSS over ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(parts[1]), int(parts[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_stage(args: list[str], cwd: Path, log) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "deepcontent.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed with exit code {proc.returncode}; see the log")
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak[0] / 2**30, 2), "result": result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=TASTE_USERS)
    ap.add_argument("--songs", type=int, default=TASTE_SONGS)
    ap.add_argument("--factors", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-generate", action="store_true", help="reuse the catalog already in --workdir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    mean = TASTE_LINES / TASTE_USERS * 1.1  # distinct-song draws saturate a little below the mean
    common = [f"synth.users={args.users}", f"synth.songs={args.songs}", f"synth.mean_plays_per_user={mean}",
              "synth.audio=false", "synth.lastfm_format=none", f"factorize.factors={args.factors}",
              f"factorize.iterations={args.iterations}", "spark.driver_memory=8g"]
    stages = ["ingest", "matrices", "factorize"] if args.skip_generate else ["generate", "ingest", "matrices", "factorize"]
    report: dict = {"users": args.users, "songs": args.songs, "cores": os.cpu_count(), "stages": {}}
    with open(work / "scale.log", "a") as log:
        for stage in stages:
            print(f"scale: running {stage} ...", file=sys.stderr, flush=True)
            r = run_stage([stage, "--json", *common], work, log)
            report["stages"][stage] = {"wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"],
                                       "counts": r["result"].get("counts") or {k: v for k, v in r["result"].items() if isinstance(v, int)}}
            print(f"scale: {stage}: {r['wall_s']} s, peak {r['peak_rss_gib']} GiB", file=sys.stderr, flush=True)
    s = report["stages"]
    report["matrices_plus_factorize_s"] = round(s["matrices"]["wall_s"] + s["factorize"]["wall_s"], 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
