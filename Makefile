# The two commands a newcomer needs:
#   make run    install chatd into .venv and run it in the foreground with its defaults
#   make test   install chatd, its test tools and system test dependencies, run every test
# and one for figures:
#   make bench  run the benchmark (python -m bench; BENCH_ARGS="W1 --peer go-gorilla ..." to choose)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test install install-test install-bench bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet .
	@# refresh Twisted's plugin cache so `twistd chatd` is found at once
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

install-test: $(PY)
	$(PY) -m pip install --quiet ".[test]"
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	./scripts/install-test-deps

run: install
	$(VENV)/bin/twistd --nodaemon --pidfile= chatd

test: install-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

install-bench: $(PY)
	$(PY) -m pip install --quiet ".[bench]"
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# Server on CPU 0, client on CPU 1; one JSON line per step on stdout and in bench/results/.
BENCH_ARGS ?= --server-cpu 0 --client-cpu 1
bench: install-bench
	mkdir -p bench/results
	$(PY) -m bench $(BENCH_ARGS) --out bench/results/$$(date +%Y%m%d)-bench.jsonl

lint: $(PY)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info tests/node/node_modules
