# Fresh machine: `make demo` runs the main job, `make test` runs the tests. Both create .venv when missing.
# requirements.lock pins wheels for Python 3.11 (the cluster image's): prefer that interpreter where it exists.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every third-party package at an exact version and hash (extras server, dashboard and test included): CI and
# every cluster node install this file, so CI tests exactly what the cluster runs. `make lock` regenerates it from pyproject.toml.
LOCK := requirements.lock
UV_VERSION := 0.13.10

.PHONY: demo test system-deps bench clean lock

# The lock is installed by uv (its own venv, .lock-venv): the same hashes as pip checks, in about 25 s where pip
# takes about 220 s on a fresh machine. The cluster nodes install the same file with pip.
UV := .lock-venv/bin/uv

$(UV):
	test -x $(UV) || ($(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q uv==$(UV_VERSION))

$(STAMP): $(LOCK) pyproject.toml | $(UV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(VENV) runs Python \
	$$($(PY) -c 'import platform; print(platform.python_version())'), but $(LOCK) pins wheels for Python 3.11: \
	remove $(VENV) and run make PYTHON=/path/to/python3.11"; exit 2; }
	$(UV) pip install -q --python $(PY) --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The lock for Linux x86_64, Python 3.11 (the cluster image's and CI's), from PyPI; uv lives in its own venv.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra server --extra dashboard --extra test --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
		--custom-compile-command "make lock" -o $(LOCK)

# Debian packages the tests drive (never downloaded by a test tool): Chromium + ChromeDriver for the MLflow UI
# test; OpenSSH server, rsync, PostgreSQL and sudo (the head's tracking user) for the cluster rehearsal
# (tests/test_cluster_rehearsal.py).
SYSTEM_PACKAGES := chromium chromium-driver openssh-server openssh-client rsync postgresql sudo
system-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -x /usr/sbin/sshd ] && command -v rsync >/dev/null \
		&& [ -x /usr/bin/sudo ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; \
	else echo "install the test's system packages: sudo apt-get install -y $(SYSTEM_PACKAGES)"; fi

demo: $(STAMP)
	$(PY) pipelines/demo.py

test: $(STAMP) system-deps
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/promotion_gate.py
	$(PY) bench/verdict_calibration.py --json bench/results/verdict_calibration.json
	$(PY) bench/run.py
	$(PY) bench/trial_startup.py --rounds 2 --json bench/results/trial_startup.json
	$(PY) bench/shard_size.py --json bench/results/shard_size.json
	$(PY) bench/data_path.py --json bench/results/data_path.json
	$(PY) bench/search_efficiency.py --json bench/results/search_efficiency.json
	$(PY) bench/tracking_load.py
	$(PY) bench/train_efficiency.py --crops paper=32 --reps 9 --json bench/results/train_efficiency.json
	$(PY) bench/recipe_parity.py --workdir bench/results/recipe_parity

clean:
	rm -rf demo_out runs test-artifacts .pytest_cache
