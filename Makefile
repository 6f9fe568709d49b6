# Two commands for a newcomer: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# What the product and its tests need from Debian (installed when root and missing).
# nftables, conntrack, iproute2: the real-topology test (network namespaces, deploy/lb/udp-dnat.sh).
# BUILD_DEBS: DTLSSocket (tinydtls) ships as source only; its build runs autoreconf.
BUILD_DEBS := autoconf automake libtool gcc python3-dev
RUN_DEBS := libcoap3-bin mosquitto-clients
TEST_DEBS := redis-server mosquitto mosquitto-clients libcoap3-bin docker-compose git nodejs \
	nftables conntrack iproute2

.PHONY: run test lint typecheck pytest bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { scripts/ensure-debian-packages.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	@scripts/ensure-debian-packages.sh $(BUILD_DEBS) || echo "(DTLSSocket builds from source and needs these: pip may fail below)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
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
