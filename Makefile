# The two commands of the README work on a fresh machine:
#   make demo   runs the example assistant app on embedded SQLite (PORT=5000 by default)
#   make test   runs the whole test suite (SQLite, PostgreSQL, a real Chromium)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
PORT ?= 5000

.PHONY: demo test test-adoption test-runtime-to-handoff lint typecheck docs bench browser services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[postgres]" --group dev
	touch $(STAMP)

# The demo needs only the package and the example's own dependencies, not the dev toolchain.
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . --group demo
	touch $(DEMO_STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; \
	fi

# PostgreSQL, and Redis and RabbitMQ for the Celery tests, started unless they already answer.
ANSWERS = $(PYTHON) -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)"
services:
	@if ! $(ANSWERS) 5432 2>/dev/null; then \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	fi
	@if ! $(ANSWERS) 6379 2>/dev/null; then \
		redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
			--dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	fi
	@if ! $(ANSWERS) 5672 2>/dev/null; then \
		rabbitmq-server -detached; \
		rabbitmqctl await_startup --timeout 120 >/dev/null; \
	fi
	@$(ANSWERS) 5432 && $(ANSWERS) 6379 && $(ANSWERS) 5672 && echo "services: PostgreSQL, Redis and RabbitMQ answer"

demo: $(DEMO_STAMP)
	PORT=$(PORT) $(BIN)/python -m examples.assistant.demo

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-adoption: $(STAMP)
	$(BIN)/python -m pytest -m adoption

test-runtime-to-handoff: $(STAMP)
	$(BIN)/python -m pytest -m runtime_to_handoff

lint: $(STAMP)
	$(BIN)/ruff check flask_scoria tests migrations examples bench
	$(BIN)/ruff format --check flask_scoria tests migrations examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

# By hand, never in CI: figures are ratios measured in one run (see bench/README.md).
bench: $(STAMP)
	$(BIN)/python bench/approval_roundtrip.py
	$(BIN)/python bench/background.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) dist build docs/_build test-artifacts .pytest_cache .mypy_cache
