# kif's two entry points (both idempotent):
#   make demo   set kif up and erase a person from the embedded fact-world model
#   make test   set kif up and run the tests (unit tests and the notebooks)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KIF := $(VENV)/bin/kif
# The CPU build of torch: unpinned, pip pulls a CUDA build and several GB of nvidia wheels.
TORCH ?= torch==2.13.0
# A person of the fact world (seed 0), in the forget01 split.
DEMO_PERSON ?= Miasmar Viahos

.PHONY: setup demo test bench clean

setup: $(VENV)/.kif-installed

$(VENV)/.kif-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e '.[test]'
	touch $@

demo: setup
	$(KIF) zoo list
	$(KIF) signatures --model fact-world --concept "$(DEMO_PERSON)" --kind concept-vectors --out runs/demo-signature --overwrite
	rm -rf runs/demo-erased runs/demo-restored
	$(KIF) erase --model fact-world --concept "$(DEMO_PERSON)" --out runs/demo-erased
	$(KIF) restore runs/demo-erased --out runs/demo-restored

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
