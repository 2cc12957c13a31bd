# Kanaria: `make demo` to see it run, `make test` for the whole suite.
CARGO ?= cargo

.PHONY: all deps build demo test fmt clippy check-config check-deploy test-deps bench clean

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

# The deploy tests also run promtool (rules) and a real Prometheus server (scrape test):
# Debian's `prometheus` ships both. Installed like cmake; its service is not started.
test-deps: deps
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing prometheus (promtool) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    echo "installing prometheus (promtool) with sudo apt-get"; \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "the deploy tests need promtool and prometheus: install Prometheus (e.g. 'brew install prometheus', or a release from prometheus.io)"; \
	    exit 1; \
	  fi; }

build: deps
	$(CARGO) build --release

demo: build
	./scripts/demo.sh

test: test-deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test

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
