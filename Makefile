# deepcontent — the two commands a new machine needs:
#   make demo   set up, then run the main job end to end on the embedded default
#   make test   set up, then run the test suite (what CI runs)
# Set-up is idempotent: it (re)installs only when pyproject.toml or constraints.txt changed.
# Every package is pinned by constraints.txt (the lock; `make constraints` regenerates it).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed first, pinned, so nothing later pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
# Airflow lives in virtualenvs of its own (its pins never meet the package's): the DAG test
# imports infra/airflow/deepcontent_nightly.py into a real DagBag in each, Airflow 3 and 2.
AIRFLOW_VENV  ?= .venv-airflow
AIRFLOW2_VENV ?= .venv-airflow2

.PHONY: setup browser demo test test-slow bench clean constraints airflow-env

setup: $(VENV)/.installed browser

# Headless Chromium renders the HTML evaluation report in its test. Best effort: installed only
# where we are root with apt; elsewhere that one test is skipped, never failed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report's browser test will be skipped"; }

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@command -v java >/dev/null || { echo "Java 17+ is required by Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	@touch $@

# Rewrite the lock from the working .venv (after changing a dependency in pyproject.toml, upgrade
# in .venv, run the tests, then `make constraints`). torch is pinned by TORCH_SPEC instead. No
# prerequisite on the venv's stamp, which would first re-install the old pins over the upgrade.
constraints:
	@test -x $(BIN)/pip || { echo "no $(VENV): run make setup first"; exit 1; }
	@{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -v '^#' \
	   | grep -viE '^(torch|pyflakes)=='; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@touch $(VENV)/.installed
	@echo "wrote $(CONSTRAINTS)"

airflow-env: $(AIRFLOW_VENV)/.installed $(AIRFLOW2_VENV)/.installed

$(AIRFLOW_VENV)/.installed: infra/airflow/requirements-airflow3.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet -r $<
	@touch $@

$(AIRFLOW2_VENV)/.installed: infra/airflow/requirements-airflow2.txt
	$(PYTHON) -m venv $(AIRFLOW2_VENV)
	$(AIRFLOW2_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW2_VENV)/bin/pip install --quiet -r $<
	@touch $@

demo: setup
	$(BIN)/deepcontent pipeline --config conf/demo.yaml

test: setup airflow-env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf .deepcontent spark-warehouse
