PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[dev,litert]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo --out lowbit-demo --force

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info
