# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first if needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
AVP := $(VENV)/bin/avp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast mutate bench airflow airflow-cluster constraints clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

airflow: setup  ## the Airflow UI with the avp_daily DAG on http://127.0.0.1:8080 (Ctrl-C stops it)
	@bash scripts/airflow_standalone.sh

airflow-cluster: setup  ## CeleryExecutor: PostgreSQL, Redis, scheduler & co, 2 workers (docs/deploy.md; Ctrl-C stops it)
	@bash scripts/install_servers.sh
	@bash scripts/airflow_cluster.sh

test: setup  ## also installs the servers tests start (PostgreSQL) when missing and run as root
	@bash scripts/install_servers.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## skip the slow tests (one small real Spark job + GE validation still runs: test_engines_quick)
	@bash scripts/install_servers.sh
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

mutate: setup  ## mutation testing of the silent-mistake modules, one at a time (MODULES="..." for some, AGAIN=1 to rerun only the last survivors; docs/testing.md)
	nice -n 10 $(PY) scripts/mutate.py $(if $(AGAIN),--again) $(MODULES)

bench: setup  ## every benchmark, one after the other (results go into docs/benchmarks.md by hand)
	$(PY) -m bench.ingest_bench
	$(PY) -m bench.validate_bench
	$(PY) -m bench.train_bench
	$(PY) -m bench.evaluate_bench
	$(PY) -m bench.serve_bench
	$(PY) -m bench.airflow_bench

constraints:  ## refreeze constraints.txt from the current venv
	@(echo "# Full freeze of the pipeline's environment (Python 3.11). Regenerate with: make constraints"; \
	  echo "# torch is pinned without a local label so the CPU build here and the CUDA build elsewhere both match."; \
	  $(PY) -m pip freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+.*/torch==\1/' \
	    -e 's|^horovod @ .*|horovod==0.28.1|' | grep -v '^avp') > constraints.txt

clean:  ## remove the pipeline home (data, registry, runs); keeps .venv
	rm -rf .avp
