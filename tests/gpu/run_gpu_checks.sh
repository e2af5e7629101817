#!/usr/bin/env bash
# GPU checks for deepcontent: train the paper CNN with train.use_gpu=true (bf16, NCCL, one worker
# per GPU) and embed with embed.use_gpu=true on a small generated catalog; print one JSON line
# (samples/s, GPU utilisation, input-bound or not, GPU-vs-CPU agreement of the embeddings).
# Never part of the default test run; the default run only checks `--dry-run`.
#
#   tests/gpu/run_gpu_checks.sh [--dry-run] [--python PY] [--wheels DIR] [--venv DIR] [-- ARGS]
#
# Environment: a virtualenv of its own (--venv, default .venv-gpu). Where PY's torch already sees a
# CUDA device (a GPU image), the venv inherits it (--system-site-packages) and the machine's CUDA
# torch is used; elsewhere the venv gets PyPI's CUDA build of torch. The package's own
# dependencies come from constraints.txt when the package index is reachable, from --wheels DIR
# (pip download'ed wheels, e.g. pydantic for an offline GPU box) otherwise; the checks run the
# Ray Train / Ray Data stages when Ray is importable and the same step in plain torch DDP when not
# (the JSON says which: "path"). ARGS after `--` go to tests/gpu/gpu_checks.py (--clips, ...).
# Budget: under 8 minutes wall on one H100 / H200 with the defaults.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv-gpu"
WHEELS=""
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --python) PY="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --venv) VENV="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_gpu_checks.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[run_gpu_checks $(date +%H:%M:%S)] $*" >&2; }

if [ "$DRY_RUN" = 1 ]; then
  bash -n "$0"                                               # this script parses
  "$PY" -m py_compile "$ROOT/tests/gpu/gpu_checks.py" "$ROOT/tests/gpu/ray_path.py"
  echo "plan (dry run; nothing installed or run):"
  echo "  environment: $VENV (--system-site-packages when $PY's torch sees CUDA, else PyPI's CUDA torch)"
  echo "  dependencies: pip install -c constraints.txt <package deps>${WHEELS:+, or from $WHEELS offline}"
  echo "  then: PYTHONPATH=src $VENV/bin/python tests/gpu/gpu_checks.py --device cuda ${EXTRA[*]:-}"
  PYTHONPATH="$ROOT/src" "$PY" "$ROOT/tests/gpu/gpu_checks.py" --plan --device cuda "${EXTRA[@]}"
  exit 0
fi

command -v nvidia-smi >/dev/null || { echo "run_gpu_checks.sh: nvidia-smi not found: this needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2

# 1. the environment
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "using $PY's CUDA torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    say "installing PyPI's CUDA build of torch into $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch
  fi
fi
VPY="$VENV/bin/python"
# 2. the package's dependencies (torch excluded: the GPU build above stays)
DEPS="$("$VPY" - "$ROOT" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(f"{sys.argv[1]}/pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if not re.match(r"torch\b", d)))
EOF
)"
if [ -n "$WHEELS" ]; then
  say "installing what $WHEELS holds (offline)"
  "$VPY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl || say "some wheels did not install"
else
  say "installing the package's dependencies from the index, pinned by constraints.txt"
  # shellcheck disable=SC2086
  grep -v '^torch==' "$ROOT/constraints.txt" > "$VENV/constraints-no-torch.txt"
  "$VPY" -m pip install --quiet -c "$VENV/constraints-no-torch.txt" $DEPS \
    || say "dependencies could not all be installed (no index?): the checks use what is importable"
fi
# 3. the checks
say "running tests/gpu/gpu_checks.py"
cd "$ROOT"
PYTHONPATH="$ROOT/src" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" "$VPY" tests/gpu/gpu_checks.py --device cuda "${EXTRA[@]}"
