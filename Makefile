# sct-node: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Extra pip options for torch, e.g. TORCH_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_OPTS ?=
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all venv peers demo test test-fast reliability reliability-short lint typecheck bench-ingest bench-latency bench-sampler bench-qa bench-web screenshots web serve clean

all: test

# torch first (the CPU build on a CPU machine), then the project: a bare `torch` requirement on a
# machine without torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_OPTS) torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

peers:
	@./scripts/ensure-peers.sh

demo: venv
	$(VENV)/bin/sct-node demo

test: venv peers
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Unit tests only (no DCMTK/Orthanc).
test-fast: venv
	$(VENV)/bin/pytest -m "not integration" $(PYTEST_ARGS)

# Fault, load, bad-input and security tests in their long versions (20+ kills, thousands of fuzzed
# inputs, four scanners x 300 slices...); writes docs/reliability.md. `make test` runs the short ones.
reliability: venv peers
	$(PY) scripts/reliability_report.py

# The same report from the short (CI) versions: a quick check that the report works.
reliability-short: venv peers
	$(PY) scripts/reliability_report.py --short --output docs/reliability-short.md

lint: venv
	$(VENV)/bin/ruff check dicom_node sct_model training tests benchmarks
	$(VENV)/bin/ruff format --check dicom_node sct_model training tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy dicom_node sct_model training

serve: venv
	$(VENV)/bin/sct-node serve

bench-ingest: venv peers
	$(PY) benchmarks/ingest.py

bench-latency: venv peers
	$(PY) benchmarks/latency.py

bench-sampler: venv
	$(PY) benchmarks/sampler.py

# How well the QA's in_distribution check separates held-out phantoms from generated out-of-distribution
# MRs (ROC AUC, false holds) and what the checks cost on a 300-slice series (minutes on a CPU).
bench-qa: venv
	$(PY) benchmarks/qa.py

# The review page's screenshots in docs/ (the browser test, with a real node, Orthanc and Chromium).
screenshots: venv peers
	SCT_WEB_SCREENSHOTS=docs $(VENV)/bin/pytest -q tests/web/test_browser.py

# The review page: time to first paint of a 300-slice job, bytes sent, the worklist with 10,000 jobs.
bench-web: venv peers
	$(PY) benchmarks/web.py

web: venv
	$(VENV)/bin/sct-node web

clean:
	rm -rf var demo-output .pytest_cache
