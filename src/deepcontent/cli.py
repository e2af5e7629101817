"""``deepcontent`` command line: one subcommand per stage, plus ``pipeline``.

Every subcommand takes ``--config FILE`` (default: the embedded default, conf/local.yaml) and
any number of ``key.path=value`` overrides, e.g.::

    deepcontent generate synth.songs=500 synth.audio_format=ogg
    deepcontent ingest --config conf/cluster.yaml spark.master=spark://head:7077
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from deepcontent.config import ConfigError, load_config
from deepcontent.manifest import log, setup_logging


def _cmd_generate(cfg, args) -> dict:
    from deepcontent.engines.context import open_storage
    from deepcontent.synth.generate import generate

    with open_storage(cfg) as storage:
        return generate(cfg, storage)


def _ingest(cfg, storage) -> dict:
    from deepcontent.engines.spark import spark_session
    from deepcontent.ingest import run_ingest
    from deepcontent.warehouse import Warehouse

    spark = spark_session(cfg.spark)
    try:
        with Warehouse.from_config(cfg.warehouse, storage) as warehouse:
            r = run_ingest(cfg, storage, spark, warehouse=warehouse)
    finally:
        spark.stop()
    return {"run_id": r.run_id, "published": r.published, "counts": r.counts,
            "quarantined": r.quarantined, "outputs": r.outputs, "manifest": r.manifest_uri}


def _cmd_ingest(cfg, args) -> dict:
    from deepcontent.engines.context import open_storage

    with open_storage(cfg) as storage:
        return _ingest(cfg, storage)


def _spectrograms(cfg, storage) -> dict:
    from deepcontent.engines.spark import spark_session
    from deepcontent.spectrograms import run_spectrograms

    spark = spark_session(cfg.spark)
    try:
        r = run_spectrograms(cfg, storage, spark)
    finally:
        spark.stop()
    return {"run_id": r.run_id, "published": r.published, "counts": r.counts,
            "quarantined": r.quarantined, "outputs": r.outputs, "manifest": r.manifest_uri}


def _cmd_spectrograms(cfg, args) -> dict:
    from deepcontent.engines.context import open_storage

    with open_storage(cfg) as storage:
        return _spectrograms(cfg, storage)


def _matrices(cfg, storage) -> dict:
    from deepcontent.engines.spark import spark_session
    from deepcontent.matrices import run_matrices

    spark = spark_session(cfg.spark)
    try:
        r = run_matrices(cfg, storage, spark)
    finally:
        spark.stop()
    return {"run_id": r.run_id, "published": r.published, "counts": r.counts,
            "quarantined": r.quarantined, "outputs": r.outputs, "manifest": r.manifest_uri}


def _factorize(cfg, storage) -> dict:
    from deepcontent.factorize.stage import run_factorize
    from deepcontent.warehouse import Warehouse

    spark = None
    if cfg.factorize.backend == "spark":
        from deepcontent.engines.spark import spark_session

        spark = spark_session(cfg.spark)
    try:
        with Warehouse.from_config(cfg.warehouse, storage) as warehouse:
            r = run_factorize(cfg, storage, spark, warehouse=warehouse)
    finally:
        if spark is not None:
            spark.stop()
    return {"run_id": r.run_id, "published": r.published, "counts": r.counts, "outputs": r.outputs,
            "manifest": r.manifest_uri}


def _with_storage(fn):
    def cmd(cfg, args) -> dict:
        from deepcontent.engines.context import open_storage

        with open_storage(cfg) as storage:
            return fn(cfg, storage)

    return cmd


def _cmd_pipeline(cfg, args) -> dict:
    from deepcontent.engines.context import open_storage
    from deepcontent.synth.generate import generate

    out: dict = {}
    with open_storage(cfg) as storage:
        if not args.skip_generate:
            out["generate"] = generate(cfg, storage)
        out["ingest"] = _ingest(cfg, storage)
        out["spectrograms"] = _spectrograms(cfg, storage)
        out["matrices"] = _matrices(cfg, storage)
        out["factorize"] = _factorize(cfg, storage)
        out["warehouse"] = cfg.warehouse.uri
        out["storage"] = {"root": storage.root, "served_from": cfg.storage.embedded_s3_dir if cfg.storage.embedded_s3 else None}
    return out


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
    s = result["storage"]
    if s.get("served_from"):
        print(f"  the s3:// URIs above are files under {s['served_from']}/ (served by the embedded S3 server)")


COMMANDS: dict[str, tuple[Callable, str]] = {
    "generate": (_cmd_generate, "write a synthetic catalog in the real MSD / Taste Profile / Last.fm / GTZAN / MTAT formats"),
    "ingest": (_cmd_ingest, "Spark: raw formats -> canonical tracks, plays, tags and quarantine datasets"),
    "spectrograms": (_cmd_spectrograms, "Spark: audio clips -> float16 log-mel shards (incremental, with quarantine)"),
    "matrices": (_with_storage(_matrices), "Spark: plays and tags -> stable id maps, song splits, sparse matrices (COO + CSR)"),
    "factorize": (_with_storage(_factorize), "WMF / implicit ALS on the train split (implicit, or Spark MLlib by config) -> latent factors"),
    "pipeline": (_cmd_pipeline, "run every stage in order on the configured catalog (generate first unless --skip-generate)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepcontent",
        description="Learn content-based music embeddings at catalog scale: Spark ingest and "
        "spectrograms, implicit ALS, Ray Train CNN regressors, embeddings to Iceberg.",
        epilog="Overrides: key.path=value (YAML scalars), e.g. synth.songs=500 spark.master=local[2]. "
        "Environment: DEEPCONTENT__SECTION__KEY=value. Secrets: AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or storage.credentials_file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="config YAML (default: conf/local.yaml, the embedded default)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
        if name == "pipeline":
            p.add_argument("--skip-generate", action="store_true", help="use the catalog already in storage")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
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
