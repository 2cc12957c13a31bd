#!/usr/bin/env bash
# Memory per route: Kanaria with 1 route and with BENCH_MEM_ROUTES (default 1000) routes of
# the same shape (split, metrics, analysis windows), each started fresh. Reads VmRSS once
# ready; then loads it twice: BENCH_MEM_DURATION seconds of wrk on the first route (the
# requests/s column), then BENCH_MEM_ALL_DURATION seconds (at most BENCH_MEM_MAX requests)
# cycling over every route and both versions (forced with the override header), so every
# route's windows, in-flight rings and series of both tracks are written; the default 36 s
# is a full turn of the coarse ring of a 30 s window, so every slot is written. Then reads
# /metrics once (as Prometheus does), reads VmRSS again and the peak (VmHWM), and checks in
# the status API that every route saw requests on both versions. The difference between the two configs divided by the extra
# routes is the cost of one route. Prints a markdown table and writes it to bench/results/.
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/kanaria-bench-mem.XXXXXX)"
MANY="${BENCH_MEM_ROUTES:-1000}"
DURATION="${BENCH_MEM_DURATION:-3}"
ALL_DURATION="${BENCH_MEM_ALL_DURATION:-36}"
ALL_MAX="${BENCH_MEM_MAX:-1000000}"
# Every route honours the override header, so the load can pick the version.
export BENCH_KANARIA_ROUTE_KEYS='override_header = "x-kanaria-version"'

S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
CONDITIONS="$(conditions)"

rss_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# Routes whose status shows requests on both versions (over the status window, 30 s).
both_tracks() {
  curl -s --noproxy '*' "http://127.0.0.1:$1/api/v1/status" | python3 -c '
import json, sys
routes = json.load(sys.stdin)["routes"]
print(sum(1 for r in routes if all((r["window"][v] or {}).get("requests", 0) > 0 for v in ("stable", "canary"))))'
}

RAW="$WORK/raw.txt"
: >"$RAW"
for routes in 1 "$MANY"; do
  dir="$WORK/routes-$routes"
  mkdir -p "$dir"
  port="$(free_port)"
  BENCH_ROUTES="$routes" start_proxy kanaria "$port" "$dir" "$S_PORT" "$C_PORT"
  pid="$LAST_PID"
  admin="$(cat "$dir/kanaria.admin_port")"
  ready="$(rss_kb "$pid" VmRSS)"
  res="$(run_wrk "http://127.0.0.1:$port/" "$DURATION")"
  all="$(BENCH_MEM_ROUTES="$routes" BENCH_MEM_MAX="$ALL_MAX" timeout $((ALL_DURATION + 30)) \
    wrk -t"$BENCH_THREADS" -c"$BENCH_CONNECTIONS" -d"${ALL_DURATION}s" --timeout 5s \
    -s "$BENCH_DIR/all_routes.lua" "http://127.0.0.1:$port/" 2>&1)" || die "wrk failed: $all"
  all="$(grep '^BENCH_RESULT' <<<"$all")" || die "no result from wrk: $all"
  # One scrape, as Prometheus makes every few seconds: its text is part of the peak.
  scrape_bytes="$(curl -s --noproxy '*' "http://127.0.0.1:$admin/metrics" | wc -c)"
  loaded="$(rss_kb "$pid" VmRSS)"
  peak="$(rss_kb "$pid" VmHWM)"
  covered="$(both_tracks "$admin")"
  stop_started "$pid"
  all_requests="$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$all")"
  echo "routes=$routes ready_kb=$ready loaded_kb=$loaded peak_kb=$peak both_tracks=$covered all_requests=$all_requests scrape_bytes=$scrape_bytes ${res#BENCH_RESULT }" >>"$RAW"
  log "$(tail -1 "$RAW")"
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/memory-$STAMP.md"
{
  echo "# Memory per route ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- Kanaria, one worker; RSS once ready; after ${DURATION}s of wrk load ($BENCH_CONNECTIONS connections) on the first route (requests/s) and then ${ALL_DURATION}s (at most $ALL_MAX requests) cycling over every route and both versions, and one /metrics scrape; and the peak"
  echo
  python3 "$BENCH_DIR/report.py" memory "$RAW"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/memory-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
