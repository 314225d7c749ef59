# kif's two entry points (both idempotent):
#   make demo      set kif up, erase a person from the embedded fact-world model and audit it
#   make test      set kif up and run the tests (unit tests and the notebooks)
# and, for meeting new dependency releases on purpose:
#   make upgrade   re-resolve the newest versions pyproject's ranges allow, write them to
#                  constraints.txt, rebuild .venv from them and run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KIF := $(VENV)/bin/kif
# The CPU build of torch: unpinned, pip pulls a CUDA build and several GB of nvidia wheels.
TORCH ?= torch==2.13.0
# The tested versions of every dependency (pyproject keeps the compatible ranges).
LOCK := constraints.txt
# A person of the fact world (seed 0), in the forget01 split.
DEMO_PERSON ?= Miasmar Viahos

.PHONY: setup demo test upgrade clean

setup: $(VENV)/.kif-installed

$(VENV)/.kif-installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)" -e '.[test]'
	touch $@

demo: setup
	$(KIF) zoo list
	$(KIF) signatures --model fact-world --concept "$(DEMO_PERSON)" --kind concept-vectors --out runs/demo-signature --overwrite
	rm -rf runs/demo-erased runs/demo-restored
	$(KIF) erase --model fact-world --concept "$(DEMO_PERSON)" --out runs/demo-erased
	$(KIF) restore runs/demo-erased --out runs/demo-restored
	rm -rf runs/demo-meter
	$(KIF) meter --model fact-world --erased runs/demo-erased --concept "$(DEMO_PERSON)" --probes fast --out runs/demo-meter

test: setup
	$(PY) -m pytest

# A fresh environment resolved without the lock (torch stays at $(TORCH)), frozen into the lock
# (local version tags such as +cpu dropped, so that the lock also serves other torch builds),
# then the tests on it. Review `git diff constraints.txt` and commit it when they pass.
upgrade:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --upgrade "$(TORCH)" -e '.[test]'
	{ echo "# The tested versions: written by 'make upgrade' ($$(date -u +%F), $$($(PY) -V))."; \
	  $(PY) -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK)
	touch $(VENV)/.kif-installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
