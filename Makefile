# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsilo-installed
OUT    ?= runs/demo

.PHONY: venv demo test lint-imports clean

venv: $(STAMP)

# torch first and pinned: a CPU wheel lies on disk, while letting the resolver pick torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsilo demo --out $(OUT)

lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

test: $(STAMP) lint-imports
	# Two workers: the end-to-end runs in two xdist groups (each group one test after another) beside the unit tests.
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=12

clean:
	rm -rf runs .pytest_cache
