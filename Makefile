# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
VENDOR := service/static/vendor/socket.io.esm.min.js
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast bench bench-quick base-deps system-deps redis-deps clean

# Debian packages the install needs (root, as on a fresh machine or in CI): venv and pip for the virtualenv,
# Node.js and npm for the page's vendored Socket.IO client. Nothing happens where they are present already.
base-deps:
	@command -v npm >/dev/null && $(PYTHON) -c "import ensurepip, venv" 2>/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip nodejs npm >/dev/null)

$(STAMP): pyproject.toml | base-deps
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,redis]'
	touch $(STAMP)

$(VENDOR): package.json package-lock.json scripts/vendor_js.sh | base-deps
	bash scripts/vendor_js.sh

install: $(STAMP) $(VENDOR)

# Debian packages the tests drive: Chromium for the page, redis-server for multi-instance runs.
system-deps:
	@command -v chromium >/dev/null && command -v redis-server >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium redis-server >/dev/null)

# redis-server alone, for the tests without a browser (two instances sharing events through it).
redis-deps:
	@command -v redis-server >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)

# The service on http://127.0.0.1:8080/ with the embedded database, seeded with 100,000 tasks on first run.
demo: install
	EXPORT_SEED_DEMO_ROWS=$${EXPORT_SEED_DEMO_ROWS:-100000} $(BIN)/python -m service

test: system-deps install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The same without the browser tests, for a quick loop: no Chromium needed, redis-server still is.
test-fast: redis-deps install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not browser" $(PYTEST_ARGS)

# The benchmark's report goes to var/bench.md; bench-quick runs every stage at small sizes (under two minutes).
bench: install
	$(BIN)/python scripts/bench.py run

bench-quick: install
	$(BIN)/python scripts/bench.py run --quick

# Everything set-up and runs made, var/ whole: the embedded database (every job, the seeded tasks), the default
# export directory with its files and signing key, and the benchmark's database and report.
clean:
	rm -rf $(VENV) var node_modules service/static/vendor test-output
