# TRELLIS-BOX Serving. `make demo` runs the whole pipeline locally; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VALIDATOR := tools/gltf-validator/node_modules/gltf-validator/package.json
PROTOS := $(wildcard proto/trellisbox/v1/*.proto)

# Ports for `make run` / `make demo` (0 = pick free ones for the demo).
GATEWAY_PORT ?= 50051
REFINER_PORT ?= 50052
TRELLIS_PORT ?= 50053
# Backends: auto uses SDXL / TRELLIS when weights and a GPU are present, else classic / preview.
REFINER_BACKEND ?= auto
TRELLIS_BACKEND ?= auto

.PHONY: install proto run demo test lint bench k8s-validate images clean

install: $(INSTALLED) $(VALIDATOR)

# torch is installed first by exact version: on these machines that is the CPU build on local disk;
# on a GPU host PyPI's torch==2.13.0 is the CUDA build.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(INSTALLED)

$(VALIDATOR): tools/gltf-validator/package.json tools/gltf-validator/package-lock.json
	npm ci --prefix tools/gltf-validator --no-audit --no-fund --loglevel=error

# Stubs + typed stubs (mypy-protobuf) into trellisbox/v1; a test fails when they drift from the protos.
proto: $(INSTALLED)
	$(PY) -m trellisbox.protogen .

run: install
	$(PY) -m trellisbox.demo --serve --gateway-port $(GATEWAY_PORT) --refiner-port $(REFINER_PORT) \
	  --trellis-port $(TRELLIS_PORT) --refiner-backend $(REFINER_BACKEND) --trellis-backend $(TRELLIS_BACKEND)

demo: install
	$(PY) -m trellisbox.demo --out out --refiner-backend $(REFINER_BACKEND) --trellis-backend $(TRELLIS_BACKEND)
	node tools/gltf-validator/validate.mjs out/*.glb

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy trellisbox refiner_service trellis_service gateway

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
