# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# A small real MAML job through the service (API + worker on this machine, nothing else needed):
# SmolLM2-135M, three real source tasks, SMS spam as the target; a few minutes on 2 cores.
demo: install
	bash scripts/demo

# Everything, the slow real-backbone tests included (what CI runs).
test: install
	bash scripts/ensure-services
	$(PY) -m pytest

# Without the minutes-long real-backbone training tests.
test-fast: install
	bash scripts/ensure-services
	$(PY) -m pytest -m "not slow"

# primer against the MPT paper's loop (higher) and PEFT, and the service's overhead; one JSON
# line per figure, then a table (docs/performance.md). Run it on an otherwise idle machine.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--parts meta --repeats 5".
bench: install
	bash scripts/ensure-services
	$(PY) -m bench --parts meta,pt,eval,api $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
