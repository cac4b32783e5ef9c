# pg_email — every target installs what it needs, so each works on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION := 0.18.1
PYTHON := /usr/bin/python3
E2E_DIR := $(CURDIR)/.e2e
E2E_PORT ?= 5499
PGRX_TEST_DIR := /var/tmp/pg_email-pgrx-tests
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Property tests explore with a fixed seed in `make test`, so a run is reproducible;
# `make test PROPTEST_RNG_SEED=` explores with a random one.
PROPTEST_RNG_SEED ?= 20261123
export PROPTEST_RNG_SEED

DEB_PACKAGES := postgresql-15 postgresql-server-dev-15 postgresql-contrib clang libclang-dev pkg-config sudo \
	postfix python3-aiosmtpd python3-dkim python3-psycopg python3-psycopg2 python3-pytest python3-botocore swaks \
	ca-certificates openssl libssl-dev python3-pip python3-cryptography python3-nacl curl chromium \
	libnet-ssleay-perl libio-socket-ssl-perl

.PHONY: deps build install test lint pgtest e2e demo bench clean-e2e citus

deps: .deps-stamp
.deps-stamp: Makefile
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(PYTHON) -c 'import standardwebhooks' 2>/dev/null || $(PYTHON) -m pip install -q --break-system-packages standardwebhooks==1.1.0
	@# The providers' official Python SDKs, which tests/e2e/test_send_api.py points at the listener.
	@$(PYTHON) -c 'import resend, postmarker' 2>/dev/null || \
		$(PYTHON) -m pip install -q --break-system-packages resend==2.52.0 postmarker==1.0
	@# Debian starts a default cluster and a system postfix; pg_email's tests run their own.
	@if ! cargo pgrx --version 2>/dev/null | grep -q "$(PGRX_VERSION)"; then \
		cargo install cargo-pgrx --version $(PGRX_VERSION) --locked; \
	fi
	@grep -qs 'pg15 = "$(PG_CONFIG)"' $(HOME)/.pgrx/config.toml || cargo pgrx init --pg15 $(PG_CONFIG)
	@touch $@

build: deps
	cargo build --release

# cargo pgrx installs the current version's script and the upgrade scripts (sql/pg_email--A--B.sql);
# the install scripts of released versions are kept in sql/released/, so that a database can still
# be created at an old version and updated (tests/e2e/test_upgrade.py does).
install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG)
	install -m 644 sql/released/pg_email--*.sql "$$($(PG_CONFIG) --sharedir)/extension/"

# Every test there is: the lint gates, unit tests and #[pg_test]s (one cargo pgrx test run), then
# the end-to-end suite (with the golden SQL files of tests/pg_regress) against a cluster started
# here with the worker preloaded.
test: deps lint pgtest e2e

# The style gates: formatting (rustfmt.toml) and clippy with every warning an error.
lint: deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

pgtest: deps
	mkdir -p $(PGRX_TEST_DIR) && chown postgres:postgres $(PGRX_TEST_DIR)
	cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_DIR)/data

# The providers' official Node SDKs and Nodemailer, at the versions of the lock file.
SDK_DIR := tests/e2e/sdk
$(SDK_DIR)/node_modules/.package-lock.json: $(SDK_DIR)/package.json $(SDK_DIR)/package-lock.json
	cd $(SDK_DIR) && npm ci --no-audit --no-fund --loglevel=error

# Citus 13.2.2 for tests/e2e/test_citus.py, built once from the vendored source into the system
# PostgreSQL 15 (about 1 to 3 minutes on two cores); without that source the Citus tests skip.
citus: deps
	bash scripts/citus.sh

# Then the tests marked on_citus (idempotency, suppressions, topics, templates, RLS, the API's
# validation) run again on a 3-node Citus cluster with the outbox distributed (conftest.py).
e2e: install citus $(SDK_DIR)/node_modules/.package-lock.json
	E2E_DIR=$(E2E_DIR) E2E_PORT=$(E2E_PORT) $(PYTHON) -m pytest -p no:cacheprovider -q tests/e2e
	@if bash scripts/citus.sh --check; then \
		E2E_CITUS=1 E2E_DIR=$(E2E_DIR)/on-citus E2E_PORT=$$(( $(E2E_PORT) + 60 )) \
			$(PYTHON) -m pytest -p no:cacheprovider -q -m on_citus tests/e2e; \
	else echo "Citus is not installed (no ../shared/vendor): the on_citus tests are not run on a cluster"; fi

demo: install
	@bash scripts/demo.sh

clean-e2e:
	-scripts/cluster.sh stop $(E2E_DIR)
	rm -rf $(E2E_DIR)

# Benchmarks with same-run baselines; prints a Markdown table, writes bench/results/*.json.
bench: install
	@dpkg-query -W -f='$${Status}\n' wrk nginx-light 2>/dev/null | grep -c 'install ok installed' | grep -q 2 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light >/dev/null)
	$(PYTHON) bench/bench.py $(BENCH_ONLY)
