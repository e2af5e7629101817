# deepcontent — the two commands a new machine needs:
#   make demo   set up, then run the main job end to end on the embedded default
#   make test   set up, then run the test suite (what CI runs)
# Set-up is idempotent: it (re)installs only when pyproject.toml changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first, pinned, so nothing later pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-slow bench clean

setup: $(VENV)/.installed browser

# Headless Chromium renders the HTML evaluation report in its test. Best effort: installed only
# where we are root with apt; elsewhere that one test is skipped, never failed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report's browser test will be skipped"; }

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null || { echo "Java 17+ is required by Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

demo: setup
	$(BIN)/deepcontent pipeline --config conf/demo.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf .deepcontent spark-warehouse
