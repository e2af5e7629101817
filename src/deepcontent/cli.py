"""``deepcontent`` command line: one subcommand per registered stage (:data:`deepcontent.stages.STAGES`),
plus ``generate``, ``pipeline`` and ``submit``.

Every subcommand takes ``--config FILE`` (default: the embedded default, conf/local.yaml) and
any number of ``key.path=value`` overrides, e.g.::

    deepcontent generate synth.songs=500 synth.audio_format=ogg
    deepcontent ingest --config conf/cluster.yaml spark.master=spark://head:7077

``deepcontent submit STAGE --config FILE`` runs a stage on a cluster instead (spark-submit or
``ray job submit``; see :mod:`deepcontent.submit`); ``deepcontent config show`` prints the
resolved config, secrets masked; ``deepcontent --version`` the package and code versions.

Console options, before or after the command: ``-v`` / ``--verbose`` (DEBUG lines, a failure's
full traceback, Spark's and Ray's own output as they print it), ``-q`` / ``--quiet`` (warnings
and errors only, no progress bars), ``--log-format json`` (one JSON object per log line, for
pods). What each shows is :mod:`deepcontent.console`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from deepcontent import console
from deepcontent.code_identity import check_submitted_code
from deepcontent.config import Config, ConfigError, load_config
from deepcontent.errors import SubmitError
from deepcontent.manifest import log
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


def _cmd_transfer(cfg, args) -> dict:
    """The transfer stage on a folder; with ``--model none`` and a local folder nothing is read
    from the store, so the embedded S3 server is not started: the run's manifest and metrics go
    straight to the directory it would serve."""
    tc = cfg.transfer
    local = (tc.folder is not None and (tc.folder.startswith("file://") or "://" not in tc.folder)
             and (tc.groups_file is None or "s3://" not in tc.groups_file))
    if tc.model == "none" and local and cfg.storage.embedded_s3:
        from pathlib import Path

        served = (Path(cfg.storage.embedded_s3_dir) / cfg.storage.root[len("s3://"):]).resolve()
        log.info("transfer: --model none on a local folder: no S3 server; outputs under %s", served)
        cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(
            update={"embedded_s3": False, "root": f"file://{served}"})})
    return _run(cfg, ["transfer"], generate_first=False)["transfer"]


def _print_transfer(result: dict) -> None:
    print(f"\ndeepcontent transfer finished: {result['folder']}")
    reasons = ", ".join(f"{r} {n}" for r, n in sorted((result.get("left_out_reasons") or {}).items()))
    grouping = result.get("grouping") or {}
    print(f"  clips    : {result['clips_used']} used of {result['clips_found']} found, "
          f"{len(result['clips_left_out'])} left out{' (' + reasons + ')' if reasons else ''}; "
          f"{len(result.get('classes') or {})} labels; grouping: "
          + (f"{grouping['source']} ({grouping.get('groups')} groups)" if grouping.get("source") else "none"))
    models = result.get("models") or {}
    print("  models   : " + (", ".join(f"{n} {v}" for n, v in models.items()) or "none (fixed-feature baselines only)"))
    for name, reason in (result.get("models_left_out") or {}).items():
        print(f"    not used: {name}: {reason}")
    for line in _accuracy_lines(result.get("feature_sets") or {}, indent="  "):
        print(line)
    for key, reason in list(result["clips_left_out"].items())[:10]:
        print(f"  left out : {key}: {reason}")
    if len(result["clips_left_out"]) > 10:
        print(f"  left out : ... {len(result['clips_left_out']) - 10} more in {result['outputs']['metrics']}")
    print(f"  report   : {result['outputs']['local_report']} (metrics.json beside it; {result['outputs']['metrics']})")


TRANSFER_HELP = """\
Genre-style transfer on any GTZAN-layout folder (<label>/<clip>, any codec, any length),
without a catalog. Each feature set -- every registered listening model's predicted factors and
penultimate layer (--model), spherical K-means fitted on the training folds only, log-mel
statistics, MFCC statistics -- is scored by a linear SVM with nested cross-validation twice:
stratified over clips, and grouped over artists / albums / sources (no group on both sides of any
split, inner loop too: leave-one-group-out when groups are few, else grouped k-fold); plus the
accuracy of each clip's nearest clip from another group. A stratified score far above the grouped
one means the features recognise the group, not the label. Tracks are cut into
transfer.excerpts_per_track excerpts of transfer.excerpt_seconds from their middle, features
averaged. Clips that do not decode are left out with their reason (clips_used + clips_left_out =
clips_found). --json prints one JSON object on the last line: feature_sets.<name>.stratified_mean,
stratified_std, grouped_accuracy, grouped_1nn_accuracy, ...; metrics.json documents each number.
"""


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


_COUNTS = ("n_users", "n_skipped", "n_candidates")


def _results_table(cold_start: dict, cutoffs: dict | None = None) -> list[str]:
    """The cold-start metrics as fixed-width lines, one per method, headed by their honest
    names (``mAP(full)`` when the cut-off reaches every candidate), and a line saying what a
    full-list metric is."""
    from deepcontent.evaluate.metrics import metric_label

    if not cold_start:
        return []
    first = next(iter(cold_start.values()))
    keys = [k for k, v in first.items() if k not in _COUNTS and isinstance(v, (int, float))]
    head = {k: metric_label(k).replace(" (full list)", "(full)") for k in keys}
    width = max([10, *(len(h) + 2 for h in head.values())])
    lines = [f"    {'method':<14}" + "".join(f"{head[k]:>{width}}" for k in keys)]
    for method, m in cold_start.items():
        lines.append(f"    {method:<14}" + "".join(f"{m.get(k, float('nan')):>{width}.4f}" for k in keys))
    n = first.get("n_candidates", "?")
    for k in keys:
        if k.endswith("_full"):
            short = metric_label(k).replace(" (full list)", "")
            asked = (cutoffs or {}).get(k, {}).get("k", "k")
            lines.append(f"    {head[k]}: k={asked} >= the {n} candidate test songs, so the full-list {short}, "
                         f"not comparable with {short}@{asked} over a larger catalog")
    return lines


def _seeds_lines(seeds: dict | None, *, indent: str = "    ") -> list[str]:
    """The cold-start table over repeated runs: mean ± sd per method and metric, then the
    orderings whose intervals are apart."""
    from deepcontent.evaluate.metrics import metric_label

    summary = (seeds or {}).get("cold_start") or {}
    if not summary:
        return []
    keys = [k for k, v in next(iter(summary.values())).items() if isinstance(v, dict)]
    head = {k: metric_label(k).replace(" (full list)", "(full)") for k in keys}
    width = max([18, *(len(h) + 2 for h in head.values())])
    lines = [f"{indent}over seeds {', '.join(map(str, seeds['seeds']))} (mean ± sd; WMF, regressors and CNNs refitted "
             f"per seed, same split):",
             f"{indent}{'method':<14}" + "".join(f"{head[k]:>{width}}" for k in keys)]
    for method, r in summary.items():
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['sd']:.4f}" if k in r else "—" for k in keys]
        lines.append(f"{indent}{method:<14}" + "".join(f"{c:>{width}}" for c in cells))
    for k, pairs in (seeds.get("orderings") or {}).items():
        lines.append(f"{indent}{head[k]} orderings that hold: " + (", ".join(f"{a} > {b}" for a, b in pairs) or "none"))
    diffs = seeds.get("differences") or {}
    if diffs.get("methods"):
        ref, n = diffs["reference"], len(seeds["seeds"])
        lines.append(f"{indent}minus {ref}, seed by seed (mean ± sd, seeds ahead):")
        for method, r in diffs["methods"].items():
            cells = [f"{r[k]['mean']:+.4f} ± {r[k]['sd']:.4f} {r[k]['wins']}/{n}" if k in r else "—" for k in keys]
            lines.append(f"{indent}{method:<14}" + "".join(f"{c:>{width + 4}}" for c in cells))
    return lines


def _map_se(r: dict) -> str:
    """``0.536 ± 0.041`` (the standard error when there is one), ``—`` without a mAP."""
    m, se = r.get("retrieval_map"), r.get("retrieval_map_se")
    if m is None or m != m:
        return "—"
    return f"{m:.3f} ± {se:.3f}" if se is not None and se == se else f"{m:.3f}"


def _accuracy_lines(results: dict, *, indent: str = "    ") -> list[str]:
    """Transfer results (one object per feature set) as fixed-width lines: stratified mean ± std,
    grouped (pooled) accuracy, 1-NN from another group, 1-NN from any clip."""
    rows = {n: r for n, r in results.items() if isinstance(r, dict) and "stratified_mean" in r}
    if not rows:
        return []
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    first = next(iter(rows.values()))
    g = next((r["grouped"] for r in rows.values() if isinstance(r.get("grouped"), dict)), None)
    strat = f"stratified {first['folds']}-fold" if first.get("folds") else "stratified"
    grouped = (f"grouped ({g['protocol'].replace('_', '-')}, {g['folds']} folds)" if g else "grouped")
    width = max(24, *(len(n) + 2 for n in rows))
    lines = [f"{indent}{'features':<{width}}{strat:>22}  {grouped:>44}  {'1-NN other group':>17}  {'1-NN any':>9}"
             f"  {'retrieval mAP ± se':>19}"]
    for name, r in rows.items():
        st = (f"{fmt(r.get('stratified_mean'))} ± {fmt(r.get('stratified_std'))}"
              if r.get("stratified_mean") is not None else "—")
        lines.append(f"{indent}{name:<{width}}{st:>22}  {fmt(r.get('grouped_accuracy')):>44}  "
                     f"{fmt(r.get('grouped_1nn_accuracy')):>17}  {fmt(r.get('any_1nn_accuracy')):>9}"
                     f"  {_map_se(r):>19}")
    if g is None:
        reason = first.get("grouped_skipped") or "no grouping"
        lines.append(f"{indent}(grouped: {reason})")
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
        for line in _results_table(ev["cold_start"], (ev.get("protocol") or {}).get("cold_start")):
            print(line)
        for line in _seeds_lines(ev.get("seeds")):
            print(line)
        tags = (ev.get("tag_prediction") or {}).get("methods") or {}
        if tags:
            print("    tag prediction (A′ = U′Vᵀ on the test songs): "
                  + ", ".join(f"{m} AUC {r['auc']:.3f} / mAP {r['map']:.3f}" for m, r in tags.items()))
        gtzan = (ev.get("transfer") or {}).get("gtzan") or {}
        lines = _accuracy_lines(gtzan, indent="      ")
        if lines:
            print("    GTZAN-layout transfer accuracy (linear SVM, nested CV):")
            for line in lines:
                print(line)
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
COMMANDS["transfer"] = (_cmd_transfer, STAGES["transfer"].summary)
SUBMIT_HELP = "run one stage on a cluster: spark-submit or `ray job submit` (see deepcontent submit --help)"
CONFIG_HELP = "config show: print the resolved config (base.yaml, the file, environment, overrides) as YAML, secrets masked"


def version_text() -> str:
    """``deepcontent <version> (code <git version>; sources <fingerprint>)``: the installed
    package's version, the checkout's commit when there is one, the sources' fingerprint (what
    ``deepcontent submit`` ships and checks, :mod:`deepcontent.code_identity`)."""
    from importlib.metadata import PackageNotFoundError, version

    from deepcontent import __version__
    from deepcontent.code_identity import fingerprint
    from deepcontent.manifest import code_version

    try:
        installed = version("deepcontent")
    except PackageNotFoundError:
        installed = __version__
    return f"deepcontent {installed} (code {code_version()}; sources {fingerprint()})"


class _VersionAction(argparse.Action):
    """``--version``, worked out only when asked (it runs git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _console_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v / -q / --log-format, on the main parser and again on every command (where they do not
    reset what was given before the command)."""
    def default(value):  # a command's copy leaves the attribute alone unless given there
        return value if top else argparse.SUPPRESS

    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="DEBUG lines, a failure's full traceback (redacted), and Spark's and Ray's own console "
                             "output (worker prints, Spark warnings), which otherwise go to log files")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="only warnings and errors on stderr; no progress bars")
    parser.add_argument("--log-format", choices=console.LOG_FORMATS, default=default("text"),
                        help="log lines on stderr as text (default) or one JSON object per line "
                             "(time, level, logger, message; for pods)")


def build_parser() -> argparse.ArgumentParser:
    parser = RedactingArgumentParser(
        prog="deepcontent",
        description="Learn content-based music embeddings at catalog scale: Spark ingest and "
        "spectrograms, implicit ALS, Ray Train CNN regressors, embeddings to Iceberg.",
        epilog="Overrides: key.path=value (YAML scalars), e.g. synth.songs=500 spark.master=local[2]. "
        "Environment: DEEPCONTENT__SECTION__KEY=value. Secrets: AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or storage.credentials_file. "
        "On a cluster: deepcontent submit STAGE --config FILE (spark-submit for Spark stages, "
        "ray job submit for Ray stages; see deepcontent submit --help). "
        "Console: Spark's and Ray's own output goes to log files (their errors and where the files are "
        "are shown); -v shows it all.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the package and code versions and exit")
    _console_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # parsed by deepcontent.submit (main hands it over before this parser runs); listed for --help
    sub.add_parser("submit", help=SUBMIT_HELP, description=SUBMIT_HELP, add_help=False)
    p = sub.add_parser("config", help=CONFIG_HELP, description=CONFIG_HELP)
    p.add_argument("action", choices=["show"], help="show: the resolved config")
    p.add_argument("--config", "-c", default=None, help="config YAML (default: conf/local.yaml, the embedded default)")
    p.add_argument("--json", action="store_true", help="print it as one JSON object instead of YAML")
    _console_options(p, top=False)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    for name, (_, help_text) in COMMANDS.items():
        if name == "transfer":
            p = sub.add_parser(name, help=help_text, description=TRANSFER_HELP,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="config YAML (default: conf/local.yaml, the embedded default)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        _console_options(p, top=False)
        if name == "embed-files":
            p.add_argument("--out", required=True, help="where to write the Parquet result (a path or a storage URI)")
            p.add_argument("--model", default=None, help="model version (default: embed.model_version or production)")
        if name == "pipeline":
            p.add_argument("--skip-generate", action="store_true", help="use the catalog already in storage")
            p.add_argument("--stop-after", choices=list(PIPELINE), default=None, metavar="STAGE",
                           help=f"stop after this stage (one of: {', '.join(PIPELINE)})")
        if name in ("evaluate", "pipeline"):
            p.add_argument("--seeds", type=int, default=None, metavar="N",
                           help="repeat the cold-start evaluation with seeds 0..N-1 (evaluate.seeds): WMF, every "
                                "regressor and every CNN variant refitted per seed on the same split; the table "
                                "reports mean ± sd and the orderings whose intervals are apart")
        if name == "rollback":
            p.add_argument("dataset", metavar="DATASET", help="dataset key under the storage root, or its URI")
        if name == "transfer":
            p.add_argument("--model", default=None, metavar="VERSION",
                           help="listening models to compare: all (production + every variant trained on plays; "
                                "the default, transfer.model), production, a variant name (cnn_wpe), a model version, "
                                "or none (fixed-feature baselines alone: nothing read but the folder)")
            grouping = p.add_mutually_exclusive_group()
            grouping.add_argument("--groups", default=None, metavar="FILE",
                                  help="CSV of `path,group` (path relative to the folder; group = artist, album or "
                                       "source), a local path or a URI; default: the folder's own groups.csv if any")
            grouping.add_argument("--group-level", type=int, default=None, metavar="N",
                                  help="the folder level naming the group: 2 = <label>/<group>/<clip>")
            p.add_argument("overrides", nargs="*", metavar="DIR_OR_URI | key.path=value",
                           help="the folder (a local path or s3:// / file:// URI; default transfer.folder, else the "
                                "generated GTZAN-layout set) and config overrides (transfer.excerpt_seconds=10 ...)")
        elif name == "embed-files":
            p.add_argument("overrides", nargs="+", metavar="FILE | key.path=value",
                           help="audio files or storage URIs to embed, and config overrides")
        else:
            p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def _transfer_config(cfg: Config, args) -> Config:
    """``deepcontent transfer``'s folder and options as the ``transfer`` config they stand for."""
    from deepcontent.config import TransferConfig

    if len(args.files) > 1:
        raise ConfigError(f"transfer takes one folder, got {len(args.files)}: {args.files}")
    update = {k: v for k, v in (("folder", args.files[0] if args.files else None), ("model", args.model),
                                ("groups_file", args.groups), ("group_level", args.group_level)) if v is not None}
    if "groups_file" in update or "group_level" in update:  # the command line's grouping replaces the config's
        update.setdefault("groups_file", None)
        update.setdefault("group_level", None)
    try:
        transfer = TransferConfig.model_validate({**cfg.transfer.model_dump(), **update})
    except Exception as exc:
        raise ConfigError(redact_text(f"invalid transfer options: {exc}")) from None
    return cfg.model_copy(update={"transfer": transfer})


def _is_override(arg: str) -> bool:
    """``section.key=value`` (or a top-level ``key=value``) of the config, not a file name."""
    key = arg.split("=", 1)[0]
    return "=" in arg and key.split(".", 1)[0] in Config.model_fields


_GLOBAL_FLAGS = {"-v", "--verbose", "-q", "--quiet"}


def _leading_console_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """The console options before the command (``deepcontent -v submit ...``) and the rest."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_FLAGS or arg.startswith("--log-format="):
            i += 1
        elif arg == "--log-format" and i + 1 < len(argv):
            i += 2
        else:
            break
    return argv[:i], argv[i:]


def _report_failure(message: str) -> None:
    """The one line a failed command ends with: on stderr, or a JSON ERROR line with
    ``--log-format json`` (so a pod's log stays one object per line); always redacted."""
    message = redact_text(message)
    if console.settings().log_format == "json":
        log.error("%s", message)
    else:
        print(message, file=sys.stderr)


def _show_config(cfg: Config, args) -> None:
    """``deepcontent config show``: the resolved config, every secret masked
    (:meth:`Config.public_dict`), as YAML or (``--json``) JSON."""
    data = redact(cfg.public_dict())
    if args.json:
        print(json.dumps(data, default=str))
        return
    import yaml

    print(redact_text(f"# deepcontent config: conf/base.yaml -> {args.config or 'conf/local.yaml'} -> DEEPCONTENT__* "
                      f"environment -> {len(args.overrides)} override(s); secrets shown as ***"))
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), end="")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    leading, rest = _leading_console_options(argv)
    if rest[:1] == ["submit"]:  # its own parser: a stage and cluster options (deepcontent.submit)
        from deepcontent.submit import main as submit_main

        return submit_main([*leading, *rest[1:]])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `transfer DIR --model none key=value`, `evaluate a=1 --seeds 3 b=2`: positionals after options
        transfer = getattr(args, "command", None) == "transfer"
        if any(a.startswith("-") or not (transfer or _is_override(a)) for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command in ("embed-files", "transfer"):
        args.files = [a for a in args.overrides if not _is_override(a)]
        args.overrides = [a for a in args.overrides if _is_override(a)]
    console.configure(verbose=args.verbose, quiet=args.quiet, log_format=args.log_format)
    try:  # a submitted job runs the code that was submitted, or nothing (deepcontent.code_identity)
        identity = check_submitted_code()
    except SubmitError as exc:
        _report_failure(f"deepcontent {args.command}: {exc}")
        return exc.code
    if identity:
        log.info("%s", identity)
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        if args.command == "transfer":
            cfg = _transfer_config(cfg, args)
        if getattr(args, "seeds", None) is not None:
            if args.seeds < 1:
                raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
            cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"seeds": tuple(range(args.seeds))})})
    except ConfigError as exc:
        log.debug("deepcontent %s: the configuration failed here", args.command, exc_info=True)
        _report_failure(f"deepcontent: {exc}")
        return 2
    if args.command == "config":
        _show_config(cfg, args)
        return 0
    fn, _ = COMMANDS[args.command]
    try:
        result = fn(cfg, args)
    except Exception as exc:  # one clear line for users; the traceback with -v (redacted by the handler)
        log.debug("deepcontent %s failed here:", args.command, exc_info=True)
        _report_failure(f"deepcontent {args.command}: failed: {type(exc).__name__}: {exc}"
                        + ("" if args.verbose else " (-v shows the traceback)"))
        return 1
    result = redact(json.loads(json.dumps(result, default=str)))  # what is printed carries no secret
    if args.command == "pipeline" and not args.json:
        _print_pipeline(result)
    elif args.command == "transfer" and not args.json:
        _print_transfer(result)
    elif args.command == "evaluate" and not args.json:
        print(json.dumps(result, indent=2, default=str))
        print("\ndeepcontent evaluate: cold-start recommendation on the test songs")
        for line in [*_results_table(result["cold_start"], (result.get("protocol") or {}).get("cold_start")),
                     *_seeds_lines(result.get("seeds"))]:
            print(line)
    elif not args.json:
        print(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _exit(code: int) -> None:
    """Exit with ``code``; straight away (output flushed) when an engine's shutdown was
    abandoned, since interpreter finalisation would wait on the call that hung."""
    from deepcontent.engines import ray as ray_engine

    if ray_engine.SHUTDOWN_ABANDONED:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def entry(argv: list[str] | None = None) -> None:
    """The ``deepcontent`` console script and ``jobs/*.py``: :func:`main`, then :func:`_exit`
    with its code."""
    _exit(main(argv))


if __name__ == "__main__":
    entry()
