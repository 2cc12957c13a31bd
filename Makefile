# Kanaria: `make demo` to see it run, `make test` for the whole suite.
CARGO ?= cargo

.PHONY: all deps build demo test fmt clippy check-config bench bench-quick clean

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
	@command -v python3 >/dev/null 2>&1 || echo "note: 'make demo' uses python3 for its demo apps"

build: deps
	$(CARGO) build --release

demo: build
	./scripts/demo.sh

test: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test

# Benchmarks (never part of `make test`): criterion micro-benchmarks of the hot path, then
# the comparative load, bad-canary and reload scripts under bench/ (they install nginx,
# HAProxy and wrk when missing). Knobs: BENCH_DURATION, BENCH_CONNECTIONS, BENCH_ROUNDS, ...
# (bench/README.md). `make bench-quick` is a short smoke run of the same.
bench: build
	$(CARGO) bench --bench hot_path
	python3 bench/criterion_table.py
	./bench/run.sh

bench-quick: build
	$(CARGO) bench --bench hot_path -- --warm-up-time 1 --measurement-time 2
	python3 bench/criterion_table.py
	BENCH_DURATION=3 BENCH_WARMUP=1 BENCH_ROUNDS=1 BENCH_CANARY_DURATION=6 BENCH_RELOAD_DURATION=8 BENCH_RELOADS=20 ./bench/run.sh

check-config: build
	./target/release/kanaria check config/kanaria.toml
	./target/release/kanaria check config/demo.toml

clean:
	$(CARGO) clean
