# Two commands for a new machine: `make demo` runs the demo training, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A plain `pip install torch` fetches a multi-GB CUDA build; pin the CPU wheel instead.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.delve-installed
# Warnings are errors: a docstring that renders badly fails the build like a failing test.
DOCS_BUILD := $(BIN)/python -m sphinx -W --keep-going -b html -q docs docs/_build/html

.PHONY: install demo test lint docs clean

$(STAMP): requirements/requirements.txt requirements/test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements/requirements.txt -r requirements/test.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m delve demo runs/demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -n 2 -q
	$(DOCS_BUILD)

docs: install
	$(DOCS_BUILD)

clean:
	rm -rf runs .pytest_cache docs/_build
