#!/usr/bin/env bash
# The pretraining experiment of the README ("Pretraining on unplayed audio"), end to end, in the
# current directory's embedded deployment (.deepcontent/; run it where `make demo` ran, or after
# `deepcontent pipeline --config conf/demo.yaml --stop-after train "train.variants=[cnn_mse]"`,
# so the demo catalog is in storage.root s3://deepcontent):
#
#   1. the real-audio corpus, split by package: 70% of the packages to pretrain on, 30% held out
#      (scripts/build_real_corpus.sh --split-into data/real-corpus-split);
#   2. the pretraining part as an audio-only catalog in its own root (s3://corpus) and warehouse
#      namespace: ingest, spectrograms (tracks up to 30 min), then `deepcontent pretrain` (the
#      stage defaults) once per pretraining seed, each backbone scored at once by same-package
#      retrieval on the held-out packages (never seen in pretraining);
#   3. the demo catalog's cold-start table over the seeds with the CNN from scratch (cnn_mse),
#      the CNN fine-tuned from the first seed's backbone (cnn_finetuned) and the frozen backbone +
#      ridge (pretrained_linear), beside random, bow_linear and the upper bound, with every
#      method's paired per-seed difference to cnn_mse;
#   4. retrieval on the held-out packages with the demo's from-scratch CNN, then one JSON line:
#      retrieval mAP per feature set (the backbone's mean ± sd over pretraining seeds) and the
#      cold-start differences to cnn_mse.
#
#   scripts/pretrain_experiment.sh [--config conf/demo.yaml] [--seeds 3] [--pretrain-seeds 3] [key=value ...]
# key=value overrides go to every command (e.g. train.init_lr_scale=0.3). Each step is
# incremental (a re-run reuses what is built); results: .deepcontent/pretrain-experiment/
# (one JSON per step), .deepcontent/report/ (evaluate), the summary line on stdout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dc="${DEEPCONTENT:-$repo/.venv/bin/deepcontent}"
python="${PYTHON:-$repo/.venv/bin/python}"
config="$repo/conf/demo.yaml"
seeds=3
pretrain_seeds=3
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --pretrain-seeds) pretrain_seeds="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done
case "$pretrain_seeds" in ''|*[!0-9]*|0) echo "--pretrain-seeds must be a positive integer, got '$pretrain_seeds'" >&2; exit 2 ;; esac
split="$repo/data/real-corpus-split"
out=.deepcontent/pretrain-experiment
mkdir -p "$out"
corpus=(--config "$config" storage.root=s3://corpus warehouse.namespace=corpus spectrograms.max_seconds=1800
        pretrain.corpus=debian-game-music-70pct)
# The same clips for every model: a clip is decoded with each model's own settings, and the demo
# CNN's keep the 600 s limit, so the held-out tracks longer than that are left out of every run.
heldout=("$split/heldout" --json --config "$config")

echo "== 1. corpus, split by package" >&2
"$repo/scripts/build_real_corpus.sh" --split-into "$split" >&2
echo "== 2. pretraining catalog (s3://corpus): ingest, spectrograms, pretrain × $pretrain_seeds seeds" >&2
"$dc" ingest "${corpus[@]}" sources.catalog=folder "sources.audio=file://$split/pretrain" "${extra[@]}" >&2
"$dc" spectrograms "${corpus[@]}" "${extra[@]}" >&2
for ((s = 0; s < pretrain_seeds; s++)); do
  "$dc" pretrain --json "${corpus[@]}" "pretrain.seed=$s" "${extra[@]}" | tail -n 1 > "$out/pretrain-seed-$s.json"
  version="$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_version"])' "$out/pretrain-seed-$s.json")"
  echo "   seed $s: $version" >&2
  "$dc" transfer "${heldout[@]}" --model "$version" embed.registry_root=s3://corpus \
    "transfer.report_dir=$out/transfer-pretrained-seed-$s" "${extra[@]}" | tail -n 1 > "$out/transfer-pretrained-seed-$s.json"
  if [ "$s" -eq 0 ]; then backbone="$version"; fi
done
echo "== 3. demo catalog: the fine-tuned variant from $backbone, then cold start over $seeds seeds" >&2
pre=(evaluate.pretrained_registry_root=s3://corpus "evaluate.pretrained_model=$backbone")
"$dc" train --config "$config" "train.variants=[cnn_mse,cnn_finetuned]" "${pre[@]}" "${extra[@]}" >&2
"$dc" evaluate --json --config "$config" --seeds "$seeds" "${pre[@]}" \
  "evaluate.methods=[random,bow_linear,cnn_mse,cnn_finetuned,pretrained_linear,upper_bound]" \
  evaluate.transfer=false evaluate.tag_prediction=false "${extra[@]}" | tail -n 1 > "$out/evaluate.json"
echo "== 4. held-out packages: the demo's from-scratch CNN; the summary" >&2
"$dc" transfer "${heldout[@]}" --model cnn_mse "transfer.report_dir=$out/transfer-scratch" "${extra[@]}" \
  | tail -n 1 > "$out/transfer-scratch.json"
"$python" - "$out" "$pretrain_seeds" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
def mean_sd(values):
    return {"mean": round(statistics.mean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "values": [round(v, 4) for v in values]}
runs = [json.loads((out / f"transfer-pretrained-seed-{s}.json").read_text())["feature_sets"] for s in range(n)]
scratch = json.loads((out / "transfer-scratch.json").read_text())["feature_sets"]
retrieval = {"pretrained_backbone": mean_sd([next(r["retrieval_map"] for k, r in fs.items() if k.endswith("_penultimate"))
                                             for fs in runs])}
for name, r in scratch.items():
    retrieval[name] = {"map": round(r["retrieval_map"], 4), "se": round(r.get("retrieval_map_se", float("nan")), 4)}
retrieval["chance"] = round(next(iter(scratch.values()))["retrieval_chance"], 4)
seeds = json.loads((out / "evaluate.json").read_text())["seeds"]
cold = {m: {k: {"mean": round(v["mean"], 4), "sd": round(v["sd"], 4)} for k, v in row.items()
            if k in ("auc", "map_full") and isinstance(v, dict)} for m, row in seeds["cold_start"].items()}
diff = {m: {k: {"mean": round(v["mean"], 4), "sd": round(v["sd"], 4), "wins": v["wins"]} for k, v in row.items()
            if k in ("auc", "map_full")} for m, row in seeds["differences"]["methods"].items()}
print(json.dumps({"retrieval_map": retrieval, "cold_start": cold,
                  "minus_" + seeds["differences"]["reference"]: diff, "seeds": seeds["seeds"]}))
EOF
