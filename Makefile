# Fresh machine: `make demo` runs the main job, `make test` runs the tests. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian's Chromium + ChromeDriver drive the MLflow UI test (never downloaded by a test tool).
system-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "install Chromium for the UI test: sudo apt-get install -y chromium chromium-driver"; fi

demo: $(STAMP)
	$(PY) pipelines/demo.py

test: $(STAMP) system-deps
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/promotion_gate.py
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
