"""``deepcontent`` command line: one subcommand per registered stage (:data:`deepcontent.stages.STAGES`),
plus ``generate``, ``pipeline`` and ``submit``.

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

from deepcontent.config import Config, ConfigError, load_config
from deepcontent.manifest import log, setup_logging
from deepcontent.redact import RedactingArgumentParser, redact, redact_text
from deepcontent.stages import PIPELINE, STAGES


def _run(cfg: Config, stages: list[str], *, generate_first: bool) -> dict:
    """Run ``stages`` in order on one :class:`~deepcontent.stages.StageContext` (generating the
    catalog first when asked); returns each stage's result as a dict, plus where things are."""
    from deepcontent.stages import StageContext, run_stage

    out: dict = {}
    with StageContext.open(cfg) as ctx:
        if generate_first:
            from deepcontent.synth.generate import generate

            out["generate"] = generate(cfg, ctx.storage)
        for name in stages:
            out[name] = run_stage(name, cfg, ctx).to_dict()
        out["warehouse"] = cfg.warehouse.uri
        out["storage"] = {"root": ctx.storage.root,
                          "served_from": cfg.storage.embedded_s3_dir if cfg.storage.embedded_s3 else None}
    return out


def _cmd_generate(cfg, args) -> dict:
    return _run(cfg, [], generate_first=True)["generate"]


def _stage_command(name: str) -> Callable:
    def cmd(cfg, args) -> dict:
        return _run(cfg, [name], generate_first=False)[name]

    return cmd


def _cmd_embed_files(cfg, args) -> dict:
    """Embed local files (or storage URIs) with a registered model; write one Parquet file."""
    from deepcontent.api import embed_audio, load_model, write_embeddings
    from deepcontent.registry import model_registry
    from deepcontent.stages import StageContext

    with StageContext.open(cfg) as ctx:
        model = load_model(args.model or cfg.embed.model_version, storage=model_registry(cfg, ctx.storage))
        log.info("embed-files: %d files with model %s", len(args.files), model.version)
        result = embed_audio(args.files, model=model, storage=ctx.storage)
        out = write_embeddings(result, args.out, storage=ctx.storage)
    for name, reason in result.failures.items():
        log.warning("embed-files: %s left out: %s", name, reason)
    return {"out": out, "model_version": model.version, "embedded": len(result.ids), "failed": result.failures}


def _cmd_rollback(cfg, args) -> dict:
    """Return a dataset to its last readable version (the repair for a corrupt part)."""
    from deepcontent.stages import StageContext
    from deepcontent.storage import new_run_id

    with StageContext.open(cfg) as ctx:
        target = args.dataset if "://" in args.dataset else ctx.storage.uri(args.dataset)
        pointer = ctx.storage.rollback(target, run_id=new_run_id("rollback"))
    log.info("rollback: %s is at generation %d (the version of run %s)", target, pointer["generation"],
             pointer.get("rolled_back_to"))
    return {"dataset": target, "generation": pointer["generation"], "run_id": pointer.get("rolled_back_to"),
            "replaced": pointer.get("rolled_back_from")}


def pipeline_plan(cfg: Config, *, stop_after: str | None = None) -> tuple[Config, list[str]]:
    """The stages ``deepcontent pipeline`` runs and the config it runs them with: the train stage
    also trains the model variants the evaluation reads, and ``waveforms`` runs only when a model
    it trains reads them."""
    from deepcontent.stages.evaluate import needed_variants
    from deepcontent.train.variants import variants_reading_waveforms

    names = list(PIPELINE)
    if stop_after:
        names = names[: names.index(stop_after) + 1]
    if "evaluate" in names:
        wanted = tuple(dict.fromkeys([*cfg.train.variants, *needed_variants(cfg)]))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"variants": wanted})})
    if "waveforms" in names and not ("train" in names and variants_reading_waveforms(cfg)):
        names.remove("waveforms")
    return cfg, names


def _cmd_pipeline(cfg, args) -> dict:
    cfg, names = pipeline_plan(cfg, stop_after=args.stop_after)
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
    **{name: (_stage_command(name), stage.summary) for name, stage in STAGES.items()},
    "pipeline": (_cmd_pipeline, "run every stage in order on the configured catalog (generate first unless --skip-generate)"),
    "embed-files": (_cmd_embed_files, "embed audio files (any codec) with a registered model -> one Parquet file "
                                      "(predicted factors, embedding per file)"),
    "rollback": (_cmd_rollback, "return a dataset (e.g. features/audio_index) to its last readable published version"),
}
SUBMIT_HELP = "run one stage on a cluster: spark-submit or `ray job submit` (see deepcontent submit --help)"


def build_parser() -> argparse.ArgumentParser:
    parser = RedactingArgumentParser(
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
    # parsed by deepcontent.submit (main hands it over before this parser runs); listed for --help
    sub.add_parser("submit", help=SUBMIT_HELP, description=SUBMIT_HELP, add_help=False)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="config YAML (default: conf/local.yaml, the embedded default)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
        if name == "embed-files":
            p.add_argument("--out", required=True, help="where to write the Parquet result (a path or a storage URI)")
            p.add_argument("--model", default=None, help="model version (default: embed.model_version or production)")
        if name == "pipeline":
            p.add_argument("--skip-generate", action="store_true", help="use the catalog already in storage")
            p.add_argument("--stop-after", choices=list(PIPELINE), default=None, metavar="STAGE",
                           help=f"stop after this stage (one of: {', '.join(PIPELINE)})")
        if name == "rollback":
            p.add_argument("dataset", metavar="DATASET", help="dataset key under the storage root, or its URI")
        if name == "embed-files":
            p.add_argument("overrides", nargs="+", metavar="FILE | key.path=value",
                           help="audio files or storage URIs to embed, and config overrides")
        else:
            p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def _is_override(arg: str) -> bool:
    """``section.key=value`` (or a top-level ``key=value``) of the config, not a file name."""
    key = arg.split("=", 1)[0]
    return "=" in arg and key.split(".", 1)[0] in Config.model_fields


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:  # its own parser: a stage and cluster options (deepcontent.submit)
        from deepcontent.submit import main as submit_main

        return submit_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "embed-files":
        args.files = [a for a in args.overrides if not _is_override(a)]
        args.overrides = [a for a in args.overrides if _is_override(a)]
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(redact_text(f"deepcontent: {exc}"), file=sys.stderr)
        return 2
    fn, _ = COMMANDS[args.command]
    try:
        result = fn(cfg, args)
    except Exception as exc:  # one clear line for users; the traceback at debug level
        log.debug("traceback", exc_info=True)
        print(redact_text(f"deepcontent {args.command}: failed: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return 1
    result = redact(json.loads(json.dumps(result, default=str)))  # what is printed carries no secret
    if args.command == "pipeline" and not args.json:
        _print_pipeline(result)
    elif not args.json:
        print(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
