# Inventiv: everything an operator or developer runs, one target each.
# PORT_OFFSET=10000 make <target> runs against the stack on 8003+10000.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install up down status api-expose tunnel doctor test lint format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv and install Inventiv with its development tools

up: $(STAMP)  ## Start the control plane (API + orchestrator) on SQLite and one local echo worker
	$(BIN)/inventiv up --local-worker

down: $(STAMP)  ## Stop this PORT_OFFSET's stack
	$(BIN)/inventiv down

status: $(STAMP)
	$(BIN)/inventiv status

api-expose: $(STAMP)  ## Make sure the API answers on 127.0.0.1:(8003+PORT_OFFSET); print the tunnel command
	$(BIN)/inventiv expose

tunnel: $(STAMP)  ## Run cloudflared for the API port and publish its URL to workers (ARGS="--named ...")
	$(BIN)/inventiv tunnel $(ARGS)

doctor: $(STAMP)  ## Check every link from a worker to the orchestrator
	$(BIN)/inventiv doctor

test: $(STAMP)  ## Lint, then run the whole test suite (PostgreSQL cases need a server: see README)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)  ## Heartbeat benchmark; writes docs/benchmarks.md
	$(BIN)/python bench/heartbeats.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
