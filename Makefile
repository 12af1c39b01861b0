# Two commands on a fresh machine: `make run` (the web app with the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint train-quick notebook clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, pinned to the builds this workplace serves from its local disk
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test,onnx,tune]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/boneage serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

train-quick: $(STAMP)
	$(BIN)/boneage train configs/quick.yaml

notebook: $(STAMP)
	$(BIN)/pip install -q -e ".[notebook]"
	$(BIN)/jupyter lab notebooks/demo.ipynb

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
