# Everyday commands. `make check` needs no root; `make system` does (BPF, network
# namespaces, systemd-nspawn nodes, a PostgreSQL server). CI runs scripts/test.sh,
# which is `make install` and then everything below.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: help install check lint format types unit system test deb

help:
	@echo "make install   system packages and .venv (root; scripts/setup.sh --test)"
	@echo "make check     lint, format check, types, unit tests (no root)"
	@echo "make system    BPF, netns lab, nspawn nodes, PostgreSQL tests (root)"
	@echo "make test      check + system: what CI runs"
	@echo "make format    apply ruff format"
	@echo "make deb       dist/meshnode_<version>_<arch>.deb (scripts/build-deb.sh)"

install:
	bash scripts/setup.sh --test

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

types:
	bash scripts/typecheck.sh

unit:
	$(PYTEST) tests/unit

check: lint types unit

system:
	$(PYTEST) tests/system

test: check system

deb:
	bash scripts/build-deb.sh
