"""Crash-test harness: run a stage through the CLI, kill it with SIGKILL at a named point
(``DEEPCONTENT_CRASH_AT``, :mod:`deepcontent.faults`), re-run it, and compare what it published
with a clean run's, dataset by dataset and table by table.

Every case runs on a copy of one prepared work directory (file:// storage and a SQLite catalog,
no S3 server, so a case costs two short CLI runs), so crashed and clean runs start from the same
state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CLI = [sys.executable, "-m", "deepcontent.cli"]
# Small and fast: 30 songs of 3 s, 200 listeners; one quick epoch when a model is trained.
BASE = ["synth.songs=30", "synth.users=200", "synth.clip_seconds=3", "synth.audio_format=wav",
        "synth.gtzan_per_genre=0", "synth.mtat_clips=0", "spark.master=local[1]", "spark.shuffle_partitions=1",
        "factorize.factors=4", "factorize.iterations=3", "train.epochs=1", "train.batch_size=8",
        "train.variants=[cnn_mse]", "neighbors.k=3", "embed.in_process_max_clips=1000",
        "spectrograms.clips_per_task=8"]
# Columns that name the run or the time rather than the data: a re-run differs there by design.
VOLATILE = {"run_id", "computed_at", "shard", "ingested_at", "published_at", "detail"}


def overrides(workdir: Path) -> list[str]:
    return [f"storage.root=file://{workdir}/store", "storage.embedded_s3=false",
            f"warehouse.uri=sqlite:///{workdir}/catalog.db", *BASE]


def cli(workdir: Path, *args: str, crash_at: str | None = None, extra_env: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", **(extra_env or {}))
    env.pop("DEEPCONTENT_CRASH_AT", None)
    if crash_at:
        env["DEEPCONTENT_CRASH_AT"] = crash_at
    # the harness's settings first, so that the caller's overrides win; flags (--json) last, so
    # the overrides stay one run of positional arguments
    flags = [a for a in args[1:] if a.startswith("--")]
    rest = [a for a in args[1:] if not a.startswith("--")]
    return subprocess.run(CLI + [args[0], *overrides(workdir), *rest, *flags], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    # the catalog stores absolute metadata locations: point the copy's at the copy
    db = dst / "catalog.db"
    if db.exists():
        import sqlite3

        con = sqlite3.connect(db)
        with con:
            for table in ("iceberg_tables",):
                try:
                    con.execute(f"UPDATE {table} SET metadata_location = replace(metadata_location, ?, ?), "
                                f"previous_metadata_location = replace(previous_metadata_location, ?, ?)",
                                (str(src), str(dst), str(src), str(dst)))
                except sqlite3.OperationalError:
                    pass
        con.close()
        _rewrite_metadata(dst, str(src), str(dst))
    return dst


def _rewrite_metadata(root: Path, old: str, new: str) -> None:
    """Iceberg metadata (JSON and Avro manifests) names absolute paths: a copied warehouse must
    name its own files. JSON is rewritten as text; Avro files keep their byte layout only when
    the paths have the same length, so the copy's directory name is chosen that way."""
    assert len(old) == len(new), (old, new)
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".avro"):
            data = path.read_bytes()
            if old.encode() in data:
                path.write_bytes(data.replace(old.encode(), new.encode()))


def _canonical(table: pa.Table, workdir: Path) -> str:
    cols = sorted(c for c in table.column_names if c not in VOLATILE)
    table = table.select(cols)
    rows = []
    for row in table.to_pylist():
        # URIs name the work directory, which differs between the runs compared
        text = json.dumps({k: _round(v) for k, v in row.items()}, sort_keys=True, default=str)
        rows.append(text.replace(str(workdir), "<workdir>"))
    rows.sort()
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _round(v):
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, bytes):
        return hashlib.sha256(v).hexdigest()
    return v


def digest(workdir: Path) -> dict[str, object]:
    """A digest of every published dataset (rows, ignoring run ids and times) and every
    warehouse table, keyed by name; also the number of rows of each."""
    from deepcontent.config import load_config
    from deepcontent.storage import Storage
    from deepcontent.warehouse import TABLE_NAMES, Warehouse

    cfg = load_config(None, overrides=overrides(workdir), environ={})
    storage = Storage.from_config(cfg.storage)
    out: dict[str, object] = {}
    root = Path(str(workdir / "store"))
    for pointer in sorted(root.rglob("_published.json")):
        ds = pointer.parent
        key = str(ds.relative_to(root))
        if key.startswith(("runs", "models", "warehouse")):
            continue
        files = storage.published_files(f"file://{ds}")
        parquet = [f for f in files if f.endswith(".parquet")]
        if parquet:
            t = storage.read_parquet(parquet)
            out[key] = (t.num_rows, _canonical(t, workdir))
        else:
            out[key] = sorted(hashlib.sha256(Path(f[len("file://"):]).read_bytes()).hexdigest()[:12] for f in files)
    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        for name in TABLE_NAMES:
            if not wh.catalog.table_exists(wh.identifier(name)):
                continue
            t = wh.read(name)
            if name == "quarantine":  # a history: each run's rows; compare the latest run of each stage
                t = _latest_per_stage(t)
            out[f"table:{name}"] = (t.num_rows, _canonical(t, workdir))
    return out


def _latest_per_stage(t: pa.Table) -> pa.Table:
    if t.num_rows == 0:
        return t
    keep = np.zeros(t.num_rows, dtype=bool)
    stages = t["stage"].to_pylist()
    runs = t["run_id"].to_pylist()
    latest: dict[str, str] = {}
    for s, r in zip(stages, runs):
        latest[s] = max(latest.get(s, r), r)
    for i, (s, r) in enumerate(zip(stages, runs)):
        keep[i] = latest[s] == r
    return t.filter(pa.array(keep)).drop_columns([c for c in ("run_id",) if c in t.column_names])


def duplicate_keys(table: pa.Table, keys: list[str]) -> int:
    counts = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    return counts.filter(pc.greater(counts["count_all"], 1)).num_rows
