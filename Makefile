# fastws developer loop.  `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all build serve test docs-check lint bench clean system-deps pg-check

all: build

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "cython>=3.0" "setuptools>=77" wheel
	$(PY) -m pip install -q -e ".[chain,test]"
	touch $(STAMP)

# Compile the Cython extensions in place (fast when nothing changed).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Debian packages the test-suite talks to for real: redis-server, and chromium for
# the browser client (playwright drives the system browser; it downloads nothing);
# nginx + openssl for the TLS proxy in front of two nodes (tests/test_deploy.py), and
# prometheus for its `promtool`, which checks and unit-tests deploy/prometheus/.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi

serve: build
	$(VENV)/bin/fastws serve --demo --host 127.0.0.1 --port 8765

# The indexer's store tests use the machine's PostgreSQL (127.0.0.1:5432, trust auth,
# user postgres; FASTWS_TEST_POSTGRES names another): when none answers, say so up
# front (the suite still runs, and those tests fail with the same line).
pg-check:
	-@$(PY) tests/pg_helpers.py

test: build system-deps pg-check
	$(VENV)/bin/ruff check fastws tests loadtest
	$(PY) -m pytest -q -rs -p no:cacheprovider

# The code blocks of README.md and docs/*.md marked runnable (```sh runnable, ```python
# runnable, ```html runnable: the convention is in tests/test_docs.py), run against a
# `fastws serve --demo` of their own, and the figures generated from docs/bench/.
# `make test` runs the same file as part of the suite.
docs-check: build
	$(PY) -m loadtest.docnumbers --check
	$(PY) -m pytest -q -p no:cacheprovider tests/test_docs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fastws tests loadtest

clean:
	rm -rf build fastws/*.c fastws/*.so fastws/*.html *.egg-info
