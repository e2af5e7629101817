#!/usr/bin/env bash
# Build the real-audio corpus (README.md, "A real-audio corpus"): music from the Debian packages
# pinned in scripts/real_corpus.lock, fetched with `apt-get download` (nothing is installed),
# into data/real-corpus/ (git-ignored, never committed). Idempotent. Options: --help.
#   scripts/build_real_corpus.sh                                  # all packages
#   scripts/build_real_corpus.sh --packages asc-music --max-files 1 --out /tmp/slice
#   scripts/build_real_corpus.sh --update-lock                    # re-pin (after apt-get update)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" -m deepcontent.corpus --lock "$repo/scripts/real_corpus.lock" --out "$repo/data/real-corpus" "$@"
