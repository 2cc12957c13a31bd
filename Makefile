# Kanaria: `make demo` to see it run, `make test` for the whole suite.
CARGO ?= cargo

.PHONY: all deps build demo test fmt clippy check-config bench clean

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
	@# The dashboard test drives a real headless Chromium (Debian's chromium + chromium-driver).
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium and chromium-driver with apt-get (for the dashboard test)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "note: the dashboard test needs chromium and chromium-driver (Debian packages)"; \
	  fi; }

build: deps
	$(CARGO) build --release

demo: build
	./target/release/kanaria demo

test: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test

check-config: build
	./target/release/kanaria check config/kanaria.toml
	./target/release/kanaria check config/demo.toml

clean:
	$(CARGO) clean
