# Two entry points (see README): `make demo` runs the main job end to end, `make test` runs the tests.
# Both set up everything first: Debian packages (ffmpeg, espeak-ng) and the Python environment in .venv,
# with the versions tested in constraints.txt (pyproject.toml has the compatible ranges).
PYTHON ?= python3.11
VENV   ?= .venv
WORK   ?= work
BIN     = $(VENV)/bin
export PYTHONHASHSEED = 0

PIP     = $(BIN)/pip install -q -c constraints.txt

.PHONY: setup system-deps demo test lint bench clean

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for tool in ffmpeg espeak-ng; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng >/dev/null) || \
	      { echo "error: apt-get could not install ffmpeg espeak-ng; install them and rerun"; exit 1; }; \
	  else \
	    echo "error: missing$$missing. Install them (Debian/Ubuntu: sudo apt-get install -y ffmpeg espeak-ng) and rerun"; exit 1; \
	  fi; \
	fi

# One environment for the demo and the tests: the project with its demo extra (pipeline make-demo) and
# its test extra (pytest, ruff, ...); the tests run the demo corpus too.
$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, on its own: the CPU build from the machine's local wheels (a CUDA build would be several GB)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,demo]'
	touch $@

# The main job: demo corpus -> shards -> UME -> UME-MMA (+ baselines) -> results table and plot.
demo: setup
	$(BIN)/pipeline make-demo av_digits --out $(WORK)/raw/av_digits
	$(BIN)/pipeline build-shards av_digits --src $(WORK)/raw/av_digits --out $(WORK)/shards --size 64 --n-mels 64 --hop-length 320
	$(BIN)/python trainer/launch.py --config trainer/configs/av_digits.toml --set ray.storage_path=$(abspath $(WORK))/runs
	@echo "results: $(WORK)/runs/av_digits/results/results.md and missing_rate.png"

# The tests, after the linter (ruff, configured in pyproject.toml): CI runs both.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run.py --quick --out $(WORK)/bench

clean:
	rm -rf $(WORK)
