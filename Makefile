# Two commands on a fresh machine; each creates .venv (and installs the project into it) when missing.
#   make demo   train the toy concept on the CPU (about a minute) and render its showcase
#   make test   the test suite
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test

demo: $(VENV)/.installed
	$(PYTHON) main.py --base configs/toy/perfusion.yaml -t --name demo
	$(PYTHON) -m ldm.toy.showcase --concept "$$(ls -td logs/*_demo | head -1)/concepts/last.safetensors"

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $@
