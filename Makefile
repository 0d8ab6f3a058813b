# depeche-rs developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := $(VENV)/.build-tools
# maturin links with zig (ziglang from PyPI, found on PATH) to target glibc 2.17 without Docker.
BUILD_TOOLS := "maturin>=1.8,<2" ziglang auditwheel

.DEFAULT_GOAL := help
.PHONY: help install build wheel demo test lint format bench clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(TOOLS): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(BUILD_TOOLS)
	touch $(TOOLS)

$(STAMP): pyproject.toml Cargo.toml | $(TOOLS)
	$(BIN)/pip install -q -e ".[test,lint]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package (release build) with test and lint tools

build: $(STAMP) ## rebuild the native module into .venv after Rust changes
	$(BIN)/maturin develop --release -q

wheel: $(TOOLS) ## build the manylinux2014 abi3 wheel (zig) and the sdist into dist/, and check both
	rm -f dist/depeche_rs-*
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/maturin build --release --zig --compatibility manylinux2014 -o dist
	$(BIN)/maturin sdist -o dist
	$(BIN)/python scripts/check_dist.py dist

demo: $(STAMP) ## write 50k messages, project them and subscribe, on the embedded PostgreSQL, with figures
	$(BIN)/python -m depeche_rs demo

test: $(STAMP) ## run the Rust unit tests and the whole pytest suite against real PostgreSQL
	cargo test -q --workspace
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff, mypy --strict, stubtest, workflow schema, cargo fmt --check, clippy -D warnings
	$(BIN)/ruff check python tests benches scripts
	$(BIN)/ruff format --check python tests
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest depeche_rs._native
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	@! cargo tree -q -p depeche-rs-core -e normal | grep -q pyo3 || (echo "rust/core must not depend on pyo3" && false)

format: $(STAMP) ## format Python and Rust sources
	$(BIN)/ruff format python tests benches
	$(BIN)/ruff check --fix python tests benches
	cargo fmt --all

bench: $(STAMP) ## side-by-side benchmark vs depeche-db (ARGS=--quick for the 2-minute run)
	$(BIN)/pip install -q -r benches/requirements.txt
	$(BIN)/python benches/run.py $(ARGS)

clean: ## remove build outputs (keeps .venv and the embedded database)
	rm -rf target dist
