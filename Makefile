# Two commands for a newcomer: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps: what running needs (make run), and that plus the dev extra (make test, lint...).
RUN_STAMP := $(VENV)/.run-stamp
STAMP := $(VENV)/.installed-stamp

# What the product and its tests need from Debian (installed when root and missing).
# nftables, conntrack, iproute2: the real-topology test (network namespaces, deploy/lb/udp-dnat.sh).
# openssl: the TLS tests of the upstream client make their certificate with it.
# chromium, chromium-driver: the browser tests (tests/support/browser.py) drive a headless one.
# BUILD_DEBS: DTLSSocket (tinydtls) ships as source only; its build runs autoreconf, and our fix
# to it is applied with patch(1).
BUILD_DEBS := autoconf automake libtool gcc python3-dev patch
RUN_DEBS := libcoap3-bin mosquitto-clients
TEST_DEBS := redis-server mosquitto mosquitto-clients libcoap3-bin docker-compose git nodejs \
	nftables conntrack iproute2 openssl chromium chromium-driver tshark

.PHONY: run test lint typecheck pytest bench install install-run clean

install: $(STAMP)
install-run: $(RUN_STAMP)

# DTLSSocket is built first, from its sdist with our tinydtls fix (scripts/patches/); pip then
# finds it installed. The proxy refuses coaps with any other build.
$(RUN_STAMP): pyproject.toml scripts/install-dtlssocket.sh $(wildcard scripts/patches/*.patch)
	@$(PYTHON) -m venv $(VENV) || { scripts/ensure-debian-packages.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	@scripts/ensure-debian-packages.sh $(BUILD_DEBS) || echo "(DTLSSocket builds from source and needs these: pip may fail below)"
	$(BIN)/python -m pip install -q --upgrade pip
	scripts/install-dtlssocket.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $(RUN_STAMP)

# The dev extra (test, lint and type-check tools) only for the targets that use it.
$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(RUN_STAMP)
	@scripts/ensure-debian-packages.sh $(RUN_DEBS) || echo "(continuing: the bridge itself needs none of these)"
	$(BIN)/coap-bridge up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: here that means tests went missing, which must
# fail loudly rather than pass as "no failures".
pytest: $(STAMP)
	@scripts/ensure-debian-packages.sh $(TEST_DEBS)
	@command -v npm >/dev/null || scripts/ensure-debian-packages.sh npm
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test: lint typecheck pytest

bench: $(STAMP)
	@scripts/ensure-debian-packages.sh $(TEST_DEBS)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
