# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 first (the CPU wheel on a CPU machine), then
# the package under constraints.txt, so nothing can pull a different (CUDA) torch build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prefalign-installed
OUT    ?= out/demo

.PHONY: install demo test benchmarks clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefalign demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/base_model.py
	$(BIN)/python benchmarks/sampling.py

clean:
	rm -rf $(VENV) out runs .pytest_cache
