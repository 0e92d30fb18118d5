# Two commands on a new machine: `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test install lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/tollgate dev

# Uses Postgres/Redis where they answer (TEST_DATABASE_URL, TEST_REDIS_URL),
# otherwise starts private ones; then the whole suite, integration included.
test: $(STAMP)
	$(BIN)/ruff check .
	exports="$$($(BIN)/python scripts/test_services.py)" && eval "$$exports" && $(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	exports="$$($(BIN)/python scripts/test_services.py)" && eval "$$exports" && $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) var .pytest_cache
