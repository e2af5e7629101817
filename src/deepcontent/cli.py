"""``deepcontent`` command line: one subcommand per stage, plus ``pipeline`` and ``nightly``.

Every subcommand takes ``--config FILE`` (default: the embedded default, conf/local.yaml) and
any number of ``key.path=value`` overrides, e.g.::

    deepcontent generate synth.songs=500 synth.audio_format=ogg
    deepcontent ingest --config conf/cluster.yaml spark.master=spark://head:7077

``deepcontent submit STAGE --config FILE`` runs a stage on a cluster instead (spark-submit or
``ray job submit``; see :mod:`deepcontent.submit`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from deepcontent.config import ConfigError, load_config
from deepcontent.manifest import log, setup_logging


class _Runtime:
    """Engines a command needs, started on first use and shared by the stages it runs
    (one Spark session for a whole pipeline, not one per stage)."""

    def __init__(self, cfg, storage) -> None:
        self.cfg, self.storage = cfg, storage
        self._spark = self._warehouse = None
        self._ray_started = False

    def ensure_ray(self) -> None:
        """Start Ray once for every Ray stage of the command (stages keep a running session)."""
        import ray

        if not ray.is_initialized():
            from deepcontent.engines.ray import init_ray

            init_ray(self.cfg.ray)
            self._ray_started = True

    @property
    def spark(self):
        if self._spark is None:
            from deepcontent.engines.spark import spark_session

            self._spark = spark_session(self.cfg.spark)
        return self._spark

    @property
    def warehouse(self):
        if self._warehouse is None:
            from deepcontent.warehouse import Warehouse

            self._warehouse = Warehouse.from_config(self.cfg.warehouse, self.storage)
        return self._warehouse

    def close(self) -> None:
        if self._spark is not None:
            self._spark.stop()
        if self._warehouse is not None:
            self._warehouse.close()
        if self._ray_started:
            import ray

            ray.shutdown()


def _ingest(cfg, storage, rt):
    from deepcontent.ingest import run_ingest

    return run_ingest(cfg, storage, rt.spark, warehouse=rt.warehouse)


def _spectrograms(cfg, storage, rt):
    from deepcontent.spectrograms import run_spectrograms

    return run_spectrograms(cfg, storage, rt.spark)


def _matrices(cfg, storage, rt):
    from deepcontent.matrices import run_matrices

    return run_matrices(cfg, storage, rt.spark)


def _factorize(cfg, storage, rt):
    from deepcontent.factorize.stage import run_factorize

    spark = rt.spark if cfg.factorize.backend == "spark" else None
    return run_factorize(cfg, storage, spark, warehouse=rt.warehouse)


def _train(cfg, storage, rt):
    from deepcontent.train.stage import run_train

    rt.ensure_ray()
    return run_train(cfg, storage)


def _embed(cfg, storage, rt):
    from deepcontent.embed.stage import run_embed

    rt.ensure_ray()
    return run_embed(cfg, storage, rt.warehouse)


def _neighbors(cfg, storage, rt):
    from deepcontent.embed.neighbors import run_neighbors

    return run_neighbors(cfg, storage, rt.warehouse)


def _evaluate(cfg, storage, rt):
    from deepcontent.evaluate.stage import run_evaluate

    return run_evaluate(cfg, storage, rt)


# The stages in pipeline order.
STAGES: dict[str, Callable] = {"ingest": _ingest, "spectrograms": _spectrograms, "matrices": _matrices,
                               "factorize": _factorize, "train": _train, "embed": _embed, "neighbors": _neighbors,
                               "evaluate": _evaluate}
COMMAND_STAGES: dict[str, Callable] = dict(STAGES)


def _run(cfg, stages: list[str], *, generate_first: bool) -> dict:
    from deepcontent.engines.context import open_storage

    out: dict = {}
    with open_storage(cfg) as storage:
        if generate_first:
            from deepcontent.synth.generate import generate

            out["generate"] = generate(cfg, storage)
        rt = _Runtime(cfg, storage)
        try:
            for name in stages:
                out[name] = COMMAND_STAGES[name](cfg, storage, rt).to_dict()
        finally:
            rt.close()
        out["warehouse"] = cfg.warehouse.uri
        out["storage"] = {"root": storage.root, "served_from": cfg.storage.embedded_s3_dir if cfg.storage.embedded_s3 else None}
    return out


def _cmd_generate(cfg, args) -> dict:
    return _run(cfg, [], generate_first=True)["generate"]


def _stage_command(name: str) -> Callable:
    def cmd(cfg, args) -> dict:
        return _run(cfg, [name], generate_first=False)[name]

    return cmd


def _cmd_pipeline(cfg, args) -> dict:
    names = list(STAGES)
    if args.stop_after:
        names = names[: names.index(args.stop_after) + 1]
    out = _run(cfg, names, generate_first=not args.skip_generate)
    if "evaluate" in out:
        out["cold_start"] = out["evaluate"]["cold_start"]
    return out


def _results_table(cold_start: dict) -> list[str]:
    """The cold-start metrics as fixed-width lines, one per method."""
    if not cold_start:
        return []
    keys = [k for k in next(iter(cold_start.values())) if k not in ("n_users", "n_skipped")]
    lines = [f"    {'method':<14}" + "".join(f"{k:>10}" for k in keys)]
    for method, m in cold_start.items():
        lines.append(f"    {method:<14}" + "".join(f"{m[k]:>10.4f}" for k in keys))
    return lines


def _cmd_nightly(cfg, args) -> dict:
    from deepcontent.engines.context import open_storage
    from deepcontent.nightly import run_nightly

    with open_storage(cfg) as storage:
        rt = _Runtime(cfg, storage)
        try:
            runners = {name: (lambda fn=COMMAND_STAGES[name]: fn(cfg, storage, rt)) for name in cfg.nightly.stages}
            return run_nightly(cfg, storage, runners)
        finally:
            rt.close()


def _print_pipeline(result: dict) -> None:
    print("\ndeepcontent pipeline finished")
    g = result.get("generate")
    if g:
        print(f"  generate : {g['songs']} songs, {g['users']} users, {g['triplets']} triplets, "
              f"{g['audio_clips']} clips in {g['seconds']}s -> {g['raw_uri']}")
    i = result["ingest"]
    print(f"  ingest   : {'published' if i['published'] else 'nothing new'} "
          f"(tracks={i['counts'].get('tracks', '-')}, plays={i['counts'].get('plays', '-')}, "
          f"tags={i['counts'].get('tags', '-')}, quarantined={i['quarantined'] or 0})")
    print("  outputs  :")
    for name, uri in i["outputs"].items():
        print(f"    {name:<20} {uri}")
    print(f"    {'warehouse':<20} Iceberg tables tracks, quarantine in catalog {result['warehouse']}")
    if i.get("manifest"):
        print(f"    {'run manifest':<20} {i['manifest']}")
    sp = result.get("spectrograms")
    if sp:
        print(f"  spectrograms: {'published' if sp['published'] else 'nothing new'} "
              f"(computed={sp['counts'].get('computed', 0)}, quarantined={sp['quarantined'] or 0})")
        for name, uri in sp["outputs"].items():
            print(f"    {name:<22} {uri}")
    for stage in ("matrices", "factorize"):
        st = result.get(stage)
        if st:
            print(f"  {stage:<9}: {'published' if st['published'] else 'nothing new'} {st['counts'] or ''}")
            for name, uri in st["outputs"].items():
                print(f"    {name:<22} {uri}")
    tr = result.get("train")
    if tr:
        m = tr.get("metrics") or {}
        nmse = f"{m['valid_nmse']:.3f}" if m.get("valid_nmse") is not None else "-"
        base = f", BoW-MFCC + linear {m['baseline_valid_nmse']:.3f}" if m.get("baseline_valid_nmse") is not None else ""
        print(f"  train    : {'trained' if tr['published'] else 'already registered'} {tr.get('model_version')} "
              f"(valid NMSE {nmse}{base}) -> {tr['outputs'].get('model')}")
    for stage in ("embed", "neighbors"):
        st = result.get(stage)
        if st:
            print(f"  {stage:<9}: {'committed' if st['published'] else 'nothing new'} {st['counts'] or ''} "
                  f"-> Iceberg {st['outputs'].get('table')}")
    ev = result.get("evaluate")
    if ev:
        print("  evaluate : cold-start recommendation on the test songs (no test plays used except by upper_bound)")
        for line in _results_table(ev["cold_start"]):
            print(line)
        tags = (ev.get("tag_prediction") or {}).get("methods") or {}
        if tags:
            print("    tag prediction (A′ = U′Vᵀ on the test songs): "
                  + ", ".join(f"{m} AUC {r['auc']:.3f} / mAP {r['map']:.3f}" for m, r in tags.items()))
        gtzan = (ev.get("transfer") or {}).get("gtzan") or {}
        for name, r in gtzan.items():
            if isinstance(r, dict) and "mean" in r:
                print(f"    GTZAN-layout 10-fold accuracy, {name:<22} {r['mean']:.3f} ± {r['std']:.3f}")
        print(f"    report               {ev['report']}")
    s = result["storage"]
    if s.get("served_from"):
        print(f"  the s3:// URIs above are files under {s['served_from']}/ (served by the embedded S3 server)")


COMMANDS: dict[str, tuple[Callable, str]] = {
    "generate": (_cmd_generate, "write a synthetic catalog in the real MSD / Taste Profile / Last.fm / GTZAN / MTAT formats"),
    "ingest": (_stage_command("ingest"), "Spark: raw formats -> canonical tracks, plays, tags and quarantine datasets"),
    "spectrograms": (_stage_command("spectrograms"), "Spark: audio clips -> float16 log-mel shards (incremental, with quarantine)"),
    "matrices": (_stage_command("matrices"), "Spark: plays and tags -> stable id maps, song splits, sparse matrices (COO + CSR)"),
    "factorize": (_stage_command("factorize"), "WMF / implicit ALS on the train split (implicit, or Spark MLlib by config) -> latent factors"),
    "train": (_stage_command("train"), "Ray Train: CNN from log-mel windows to item factors (DDP, checkpoints, early stopping) -> model registry"),
    "embed": (_stage_command("embed"), "Ray Data: registered model over the spectrograms -> Iceberg embeddings (incremental, one commit per run)"),
    "neighbors": (_stage_command("neighbors"), "top-k cosine neighbours over the embeddings -> Iceberg similar_tracks"),
    "evaluate": (_stage_command("evaluate"), "cold-start metrics (mAP@500, AUC, NDCG@10, recall@50) per method, transfer to GTZAN, HTML report"),
    "nightly": (_cmd_nightly, "ingest -> spectrograms -> embed -> neighbors for new or changed tracks with the production model; run summary"),
    "pipeline": (_cmd_pipeline, "run every stage in order on the configured catalog (generate first unless --skip-generate)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepcontent",
        description="Learn content-based music embeddings at catalog scale: Spark ingest and "
        "spectrograms, implicit ALS, Ray Train CNN regressors, embeddings to Iceberg.",
        epilog="Overrides: key.path=value (YAML scalars), e.g. synth.songs=500 spark.master=local[2]. "
        "Environment: DEEPCONTENT__SECTION__KEY=value. Secrets: AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or storage.credentials_file. "
        "On a cluster: deepcontent submit STAGE --config FILE (spark-submit for Spark stages, "
        "ray job submit for Ray stages; see deepcontent submit --help).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="config YAML (default: conf/local.yaml, the embedded default)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
        if name == "pipeline":
            p.add_argument("--skip-generate", action="store_true", help="use the catalog already in storage")
            p.add_argument("--stop-after", choices=list(STAGES), default=None, metavar="STAGE",
                           help=f"stop after this stage (one of: {', '.join(STAGES)})")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:  # its own parser: a stage and cluster options (deepcontent.submit)
        from deepcontent.submit import main as submit_main

        return submit_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"deepcontent: {exc}", file=sys.stderr)
        return 2
    fn, _ = COMMANDS[args.command]
    try:
        result = fn(cfg, args)
    except Exception as exc:  # one clear line for users; the traceback at debug level
        log.debug("traceback", exc_info=True)
        print(f"deepcontent {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.command == "pipeline" and not args.json:
        _print_pipeline(result)
    elif not args.json:
        print(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
