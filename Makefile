# paysaga — every target installs what it needs (virtualenv, Kafka jars, PostgreSQL data).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PAYSAGA := $(BIN)/paysaga

.PHONY: venv up down status demo test chaos lint typecheck schemas migrate topics bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

up: venv            ## start the local stack in the background (idempotent)
	$(PAYSAGA) dev up

down: venv          ## stop everything `make up` started
	$(PAYSAGA) dev down

status: venv
	$(PAYSAGA) dev status

demo: venv          ## set up, run a mixed batch of orders through every path, summarize, stop (KEEP=1: keep it up)
	KEEP=$(KEEP) $(BIN)/python -m services.demo

test: venv          ## the whole suite on its own Kafka/PostgreSQL (ports 19092/55433)
	$(PAYSAGA) dev test -q -p no:cacheprovider $(PYTEST_ARGS)

chaos: venv         ## every chaos scenario at scale (>= 10,000 orders); a table; non-zero on any violation
	$(BIN)/python -m tests.chaos.run $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check services schemas tests benchmarks
	$(BIN)/ruff format --check services schemas tests benchmarks

typecheck: venv
	$(BIN)/mypy

schemas: venv       ## regenerate schemas/json and schemas/asyncapi.yaml from the models and topics.yaml
	$(BIN)/python -m schemas.generate

migrate: venv
	$(PAYSAGA) migrate

topics: venv
	$(PAYSAGA) topics apply

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed  ## the saga benchmark, 1 then 2 instances of each service (~15 min; BENCH_ARGS=--quick: ~1 min)
	$(BIN)/python -m benchmarks.saga $(BENCH_ARGS)

clean: down         ## stop every profile; remove .local and PostgreSQL data kept outside it
	$(PAYSAGA) dev clean
	rm -rf .local
