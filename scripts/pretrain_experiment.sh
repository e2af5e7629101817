#!/usr/bin/env bash
# The pretraining experiment of the README ("Pretraining on unplayed audio"), end to end, in the
# current directory's embedded deployment (.deepcontent/; run it where `make demo` ran, so the
# demo catalog is in storage.root s3://deepcontent):
#
#   1. the real-audio corpus, split by package: 70% of the packages to pretrain on, 30% held out
#      (scripts/build_real_corpus.sh --split-into data/real-corpus-split);
#   2. the pretraining part as an audio-only catalog in its own root (s3://corpus) and warehouse
#      namespace: ingest, spectrograms (tracks up to 30 min), `deepcontent pretrain`;
#   3. the demo catalog's cold-start table over 3 seeds with the CNN from scratch (cnn_mse), the
#      pretrained-then-fine-tuned CNN (cnn_finetuned) and the frozen backbone + ridge
#      (pretrained_linear), beside random, bow_linear and the upper bound;
#   4. same-package retrieval and transfer on the held-out packages (never seen in pretraining):
#      the pretrained backbone's penultimate layer, the demo's from-scratch CNN, log-mel and MFCC
#      statistics, K-means.
#
#   scripts/pretrain_experiment.sh [--config conf/demo.yaml] [--seeds 3] [key=value ...]
# Each step is incremental (a re-run reuses what is built); results: .deepcontent/report/
# (evaluate), .deepcontent/transfer-heldout-*/ (transfer), the JSON lines on stdout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dc="${DEEPCONTENT:-$repo/.venv/bin/deepcontent}"
config="$repo/conf/demo.yaml"
seeds=3
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done
split="$repo/data/real-corpus-split"
# Whole tracks (3 minutes on average, ≈ 60 windows each) rather than the 10-30 s clips the
# pretrain defaults are sized for: 64 window pairs per track and epoch, so an epoch is ≈ 200 steps.
corpus=(--config "$config" storage.root=s3://corpus warehouse.namespace=corpus spectrograms.max_seconds=1800
        pretrain.corpus=debian-game-music-70pct pretrain.windows_per_clip=64 pretrain.epochs=30 pretrain.patience=8)

echo "== 1. corpus, split by package" >&2
"$repo/scripts/build_real_corpus.sh" --split-into "$split" >&2
echo "== 2. pretraining catalog (s3://corpus): ingest, spectrograms, pretrain" >&2
"$dc" ingest "${corpus[@]}" sources.catalog=folder "sources.audio=file://$split/pretrain" "${extra[@]}" >&2
"$dc" spectrograms "${corpus[@]}" "${extra[@]}" >&2
"$dc" pretrain --json "${corpus[@]}" "${extra[@]}" | tail -n 1
echo "== 3. demo catalog: the fine-tuned variant, then cold start over $seeds seeds" >&2
"$dc" train --config "$config" "train.variants=[cnn_mse,cnn_finetuned]" evaluate.pretrained_registry_root=s3://corpus \
  "${extra[@]}" >&2
"$dc" evaluate --json --config "$config" --seeds "$seeds" evaluate.pretrained_registry_root=s3://corpus \
  "evaluate.methods=[random,bow_linear,cnn_mse,cnn_finetuned,pretrained_linear,upper_bound]" \
  evaluate.transfer=false evaluate.tag_prediction=false "${extra[@]}" | tail -n 1
echo "== 4. held-out packages: retrieval and transfer" >&2
# The same clips for both models: a clip is decoded with every model's own settings, and the
# demo CNN's keep the 600 s limit, so the ten planetblupi tracks longer than that are left out
# of both runs (the fixed-feature rows then agree between the two). A third run keeps them
# (whole tracks, up to 30 min, as in pretraining) for the pretrained backbone alone.
"$dc" transfer "$split/heldout" --json --config "$config" --model pretrained embed.registry_root=s3://corpus \
  transfer.report_dir=.deepcontent/transfer-heldout-pretrained "${extra[@]}" | tail -n 1
"$dc" transfer "$split/heldout" --json --config "$config" --model cnn_mse \
  transfer.report_dir=.deepcontent/transfer-heldout-scratch "${extra[@]}" | tail -n 1
"$dc" transfer "$split/heldout" --json --config "$config" --model pretrained embed.registry_root=s3://corpus \
  spectrograms.max_seconds=1800 transfer.report_dir=.deepcontent/transfer-heldout-pretrained-whole \
  "${extra[@]}" | tail -n 1
