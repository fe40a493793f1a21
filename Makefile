# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cim.ini

.PHONY: run test test-unit test-integration test-js install install-test plugin-cache proto openapi lint typecheck bench bench-full fuzz chaos services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml requirements/constraints.txt
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e .
	$(MAKE) --no-print-directory plugin-cache
	touch $@

# twistd finds the cim plugin through twisted/plugins/dropin.cache; writing it once here
# keeps daemons started side by side (the cluster tests) from racing to write it.
plugin-cache: $(BIN)/python
	$(BIN)/python -c "from twisted.application.service import IServiceMaker; \
		from twisted.plugin import getPlugins; \
		assert 'cim' in [p.tapname for p in getPlugins(IServiceMaker)]"

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Install and run the daemon in the foreground on the embedded backends. Ctrl-C (or
## SIGTERM to the daemon) stops it cleanly and make exits 0 (cim/scripts/foreground.py).
run: install
	$(BIN)/python -m cim.scripts.foreground $(BIN)/twistd --nodaemon --pidfile= cim --config $(CONFIG)

## Install the test dependencies and run the whole test suite (the JS SDK's too).
test: install-test plugin-cache test-js
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests

## The unit suite alone (tests/unit): no processes, no services, no sleeps; under a minute.
test-unit: install-test
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests.unit

## The integration suite alone (tests/integration): real daemons and services, minutes.
test-integration: install-test plugin-cache
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests.integration

## The TypeScript SDK (clients/js): npm ci (the npm registry, versions pinned by its
## package-lock.json), build, the generated code's staleness check, the protocol test
## vectors and its unit tests, and the Node <-> Python chat through a real daemon.
JS := clients/js
test-js: install-test plugin-cache
	cd $(JS) && npm ci --no-audit --no-fund && CIM_PYTHON=$(abspath $(BIN)/python) npm test

## The frame fuzzer after the handshake, both cipher suites: FUZZ_INPUTS inputs (a
## million by default; tens of minutes), counts and first failures at the end.
## FUZZ_SEED picks the inputs; FUZZ_SECONDS (if set) stops it earlier.
FUZZ_INPUTS ?= 1000000
FUZZ_SEED ?= 1
FUZZ_SECONDS ?= 0
fuzz: install-test
	$(BIN)/python -m tests.fuzz.run --inputs $(FUZZ_INPUTS) --seed $(FUZZ_SEED) \
		--seconds $(FUZZ_SECONDS)

## Regenerate cim/protocols/cim_pb2.py(i) from cim.proto.
proto: install-test
	$(BIN)/python -m grpc_tools.protoc -Icim/protocols --python_out=cim/protocols \
		--pyi_out=cim/protocols cim/protocols/cim.proto

## Regenerate docs/openapi.json, the logic service's API description.
openapi: install
	$(BIN)/python -m cim.logic.openapi docs/openapi.json

## Install and start Redis, RabbitMQ, PostgreSQL and ZooKeeper on loopback (as root).
services:
	scripts/services.sh

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/mypy

# The benchmarks also want py-spy, for the profile of the 1:1 path in bench-full.
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[test,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run --quick

bench-full: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run --full

## Three real nodes on private Redis, ZooKeeper, RabbitMQ and PostgreSQL under faults, one
## at a time; prints what applications were shown per fault and writes the table into
## docs/reliability.md (bench/chaos.py, about 5 minutes). Root, or the services' users.
chaos: install-test plugin-cache
	$(BIN)/python -m bench.chaos

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
