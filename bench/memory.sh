#!/usr/bin/env bash
# Memory per route: Kanaria with 1 route and with BENCH_MEM_ROUTES (default 1000) routes of
# the same shape (split, metrics, analysis windows), each started fresh. Reads VmRSS once
# ready, then after BENCH_MEM_DURATION seconds of load on the first route, and the peak
# (VmHWM); the difference between the two configs divided by the extra routes is the cost
# of one route. Prints a markdown table and writes it to bench/results/.
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/kanaria-bench-mem.XXXXXX)"
MANY="${BENCH_MEM_ROUTES:-1000}"
DURATION="${BENCH_MEM_DURATION:-3}"

S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
CONDITIONS="$(conditions)"

rss_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

RAW="$WORK/raw.txt"
: >"$RAW"
for routes in 1 "$MANY"; do
  dir="$WORK/routes-$routes"
  mkdir -p "$dir"
  port="$(free_port)"
  BENCH_ROUTES="$routes" start_proxy kanaria "$port" "$dir" "$S_PORT" "$C_PORT"
  pid="$LAST_PID"
  ready="$(rss_kb "$pid" VmRSS)"
  res="$(run_wrk "http://127.0.0.1:$port/" "$DURATION")"
  loaded="$(rss_kb "$pid" VmRSS)"
  peak="$(rss_kb "$pid" VmHWM)"
  stop_started "$pid"
  echo "routes=$routes ready_kb=$ready loaded_kb=$loaded peak_kb=$peak ${res#BENCH_RESULT }" >>"$RAW"
  log "$(tail -1 "$RAW")"
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/memory-$STAMP.md"
{
  echo "# Memory per route ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- Kanaria, one worker; RSS once ready, after ${DURATION}s of wrk load ($BENCH_CONNECTIONS connections) on the first route, and the peak"
  echo
  python3 "$BENCH_DIR/report.py" memory "$RAW"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/memory-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
