# The two commands a user needs: `make demo` and `make test`. Both bootstrap first (system
# packages when missing, the venv, the C++ core, tool environments), then run.
VENV ?= .venv
export EDGESMITH_HOME ?= $(CURDIR)/.edgesmith
STAMP := $(VENV)/.bootstrapped
BOOTSTRAP_INPUTS := $(wildcard scripts/*.sh) pyproject.toml CMakeLists.txt $(shell find csrc cmake -type f 2>/dev/null)

.PHONY: demo test test-fast cpp-test bootstrap clean rebuild

bootstrap: $(STAMP)

$(STAMP): $(BOOTSTRAP_INPUTS)
	VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

demo: $(STAMP)
	VENV=$(VENV) bash scripts/demo.sh

# Two xdist workers, a test file per worker at a time: much of the suite waits on brokers, agents
# and emulated devices, and module fixtures stay built once (tests/conftest.py).
PYTEST_WORKERS ?= 2

test: $(STAMP) cpp-test
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The C++ core on its own, without Python (as it is cross-compiled for devices), with GoogleTest.
cpp-test:
	bash scripts/cpp-build.sh
	ctest --test-dir build/cpp-tests --output-on-failure

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not integration and not slow"

clean:
	rm -rf build dist .pytest_cache

# Developers: rebuild the C++ core and backend plugins into the venv after editing csrc/.
rebuild:
	$(VENV)/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
