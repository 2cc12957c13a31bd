#!/usr/bin/env bash
# `make demo`: two tiny demo apps (stable v1 on :9001, canary v2 on :9002) and Kanaria in
# front of them on :8080 with config/demo.toml. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/kanaria
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
for spec in "v1:9001" "v2:9002"; do
  version=${spec%%:*}; port=${spec##*:}
  mkdir -p "$work/$version"
  echo "hello from the $version app" > "$work/$version/index.html"
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/$version" >/dev/null 2>&1 &
  pids+=($!)
done
# Wait until both demo apps accept connections, so the first request is not a 502.
for port in 9001 9002; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
done
"$bin" check config/demo.toml
cat <<'TXT'

Kanaria demo: proxy on http://127.0.0.1:8080, stable v1 on :9001, canary v2 on :9002, 20% of users on v2.
Try, in another terminal:
  for u in alice bob carol dave erin frank; do curl -s -H "x-user-id: $u" -D - -o /dev/null http://127.0.0.1:8080/ | grep -i x-kanaria-version; done
  curl -si -H 'x-kanaria-version: canary' http://127.0.0.1:8080/
Ctrl-C stops the demo.

TXT
"$bin" run -c config/demo.toml &
pids+=($!)
wait "${pids[-1]}"
