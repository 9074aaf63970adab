# The two commands a newcomer needs:
#   make run    install chatd into .venv and run it in the foreground with its defaults
#   make test   install chatd, its test tools and system test dependencies, run every test
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test install install-test lint clean

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

lint: $(PY)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info tests/node/node_modules
