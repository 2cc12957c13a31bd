# Kanaria: `make demo` to see it run, `make test` for the whole suite.
CARGO ?= cargo

.PHONY: all deps test-deps build bench-build demo test sim chaos fmt clippy check-config check-deploy bench bench-quick clean fuzz

all: build

# Pingora's zlib-ng needs cmake. Install it when missing (apt-get as root, or via sudo),
# otherwise say what to install.
deps:
	@command -v cmake >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing cmake with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    echo "installing cmake with sudo apt-get"; \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; \
	  else \
	    echo "cmake is required to build Pingora (zlib-ng): install it with your package manager (e.g. 'brew install cmake', 'dnf install cmake')"; \
	    exit 1; \
	  fi; }
# Tools the test suite runs, from Debian's packages: promtool and a real Prometheus (deploy
# and scrape tests; the service is not started), headless Chromium and its WebDriver (the
# dashboard test), curl, nghttp and h2load (HTTP/2 tests), redis-server (fleet tests; the
# tests start their own on a loopback port). Each is installed only when its command is missing.
TEST_TOOLS = promtool:prometheus prometheus:prometheus curl:curl h2load:nghttp2-client \
	nghttp:nghttp2-client redis-server:redis-server redis-cli:redis-tools
# The browser with its recommended packages (fonts).
BROWSER_TOOLS = chromedriver:chromium-driver chromium:chromium
APT_INSTALL = env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
test-deps: deps
	@set -e; install() { \
	  flags="$$1"; shift; missing=""; \
	  for pair in "$$@"; do cmd=$${pair%%:*}; command -v $$cmd >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	  [ -n "$$missing" ] || return 0; \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "the test suite needs these Debian packages (or their equivalents):$$missing"; exit 1; fi; \
	  echo "installing with apt-get:$$missing"; \
	  $$sudo apt-get update -qq && $$sudo $(APT_INSTALL) $$flags $$missing >/dev/null; \
	}; \
	install --no-install-recommends $(TEST_TOOLS); \
	install "" $(BROWSER_TOOLS)
	@# The redis-server package starts a system service on port 6379; the tests use their own.
	@if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then systemctl stop redis-server || true; fi

build: deps
	$(CARGO) build --release

demo: build
	./target/release/kanaria demo

test: test-deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --all-features -- -D warnings
	$(CARGO) test --all-features

# The fleet simulation (issue 20, src/control/fleet/sim.rs): N replicas' control planes on
# a seeded in-memory store, SIM_SEEDS seeds of SIM_STEPS steps each (`make test` runs 100
# seeds of 300 steps); SEED=S replays one seed and prints its step log.
SIM_SEEDS ?= 20000
SIM_STEPS ?= 300
SIM_FIRST_SEED ?= 1
sim:
	SEED=$(SEED) SIM_SEEDS=$(SIM_SEEDS) SIM_STEPS=$(SIM_STEPS) SIM_FIRST_SEED=$(SIM_FIRST_SEED) \
	  $(CARGO) test --all-features --lib fleet::sim -- --nocapture

# Fault injection (issue 21, tests/chaos.rs): three replicas on a real Redis under load
# while a schedule of faults derived from a seed plays; the recorded history is judged
# against six promises. SEED=S replays one seed; otherwise SEEDS=N random seeds (each
# printed); CHAOS_SECONDS per seed. History, timeline and report: target/chaos/<seed>/.
# `make test` runs three fixed seeds of 30 s (`chaos_ci_fixed_seeds`: 1, 3, 4).
SEEDS ?= 1
SEED ?=
CHAOS_SECONDS ?= 60
chaos: test-deps
	SEED=$(SEED) SEEDS=$(SEEDS) CHAOS_SECONDS=$(CHAOS_SECONDS) \
	  $(CARGO) test --all-features --test chaos -- --ignored --nocapture chaos_from_env

# Fuzzing: cargo-fuzz on nightly, FUZZ_SECONDS per target (CI runs a short one). New
# inputs go to target/fuzz-corpus, seeded from the committed fuzz/corpus. Without nightly
# or cargo-fuzz, the committed corpus is replayed on stable instead (also part of `make test`).
FUZZ_TARGETS = config override_token route_split request_head
FUZZ_SECONDS ?= 300
# Extra `cargo fuzz run` flags; CI uses `-s none` (no sanitizer: Pingora builds much faster).
FUZZ_FLAGS ?=
fuzz:
	@if $(CARGO) +nightly fuzz --version >/dev/null 2>&1; then \
	  for t in $(FUZZ_TARGETS); do \
	    mkdir -p target/fuzz-corpus/$$t; \
	    (cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t ../target/fuzz-corpus/$$t corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048) || exit 1; \
	  done; \
	else \
	  echo "make fuzz: needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz); replaying the committed corpus on stable instead"; \
	  $(CARGO) test --features internals --test fuzz_corpus; \
	fi

# Benchmarks (never part of `make test`): criterion micro-benchmarks of the hot path, then
# the comparative load, memory, bad-canary and reload scripts under bench/ (they install
# nginx, HAProxy and wrk when missing). The load compares Kanaria with a bare Pingora proxy
# (examples/bare_pingora.rs, the floor), nginx and HAProxy. Knobs: BENCH_DURATION,
# BENCH_CONNECTIONS, BENCH_ROUNDS, ... (bench/README.md). `make bench-quick` is a short smoke
# run of the same. Instruction counts per request: `BENCH_ONLY=instructions bench/run.sh`.
bench-build: build
	$(CARGO) build --release --example bare_pingora

bench: bench-build
	$(CARGO) bench --features internals --bench hot_path
	python3 bench/criterion_table.py
	./bench/run.sh

bench-quick: bench-build
	$(CARGO) bench --features internals --bench hot_path -- --warm-up-time 1 --measurement-time 2
	python3 bench/criterion_table.py
	BENCH_DURATION=3 BENCH_WARMUP=1 BENCH_ROUNDS=1 BENCH_CANARY_DURATION=6 BENCH_RELOAD_DURATION=8 BENCH_RELOADS=20 BENCH_MEM_DURATION=1 BENCH_MEM_ALL_DURATION=4 BENCH_HELD="1000 5000" ./bench/run.sh

check-config: build
	./target/release/kanaria check config/kanaria.toml
	./target/release/kanaria check config/demo.toml

# The deploy/ material alone: alert rules (syntax and unit tests) and the structure tests.
check-deploy: test-deps
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml
	$(CARGO) test --test deploy --test prometheus

clean:
	$(CARGO) clean
