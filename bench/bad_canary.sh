#!/usr/bin/env bash
# Bad canary: under the same load as load.sh, at time T the canary upstream starts answering
# 500 (scenario fail500), or, in a second run, closing connections without an answer (reset:
# nginx's 444). For each proxy: the errors clients saw, and the time from T until the canary
# got no more traffic (from the canary's own access log: its timestamps, in 100 ms bins).
# Each proxy gets its best setup for this (see lib.sh). Knobs: BENCH_CANARY_DURATION (load
# seconds, default 10), BENCH_CANARY_AT (T, default 3), BENCH_CONNECTIONS, BENCH_THREADS;
# BENCH_KANARIA_ROUTE_EXTRA adds keys to Kanaria's route (e.g. automatic rollback).
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
DURATION="${BENCH_CANARY_DURATION:-10}"
AT="${BENCH_CANARY_AT:-3}"
PROXIES="${BENCH_PROXIES:-kanaria nginx haproxy}"
SCENARIOS="${BENCH_CANARY_SCENARIOS:-fail500 reset}"
WORK="$(mktemp -d /tmp/kanaria-bench.XXXXXX)"
CONDITIONS="$(conditions)"
RAW="$WORK/raw.txt"
: >"$RAW"

for scenario in $SCENARIOS; do
  for which in $PROXIES; do
    dir="$WORK/$scenario-$which"
    mkdir -p "$dir"
    s_port="$(free_port)" c_port="$(free_port)" port="$(free_port)"
    start_upstream stable "$s_port" "$dir"; s_pid="$LAST_PID"
    start_upstream canary "$c_port" "$dir"; c_pid="$LAST_PID"
    start_proxy "$which" "$port" "$dir" "$s_port" "$c_port"; p_pid="$LAST_PID"
    run_wrk "http://127.0.0.1:$port/" 1 >/dev/null   # connections and pools warm
    run_wrk "http://127.0.0.1:$port/" "$DURATION" >"$dir/wrk.txt" &
    wrk_pid=$!
    sleep "$AT"
    t_bad="$(date +%s.%N)"
    touch "$dir/canary.$scenario"
    wait "$wrk_pid" || die "wrk failed"
    t_end="$(date +%s.%N)"
    sleep 0.3   # the canary flushes its access log every 100 ms
    out="$(python3 "$BENCH_DIR/report.py" canary-out "$dir/canary.access.log" "$t_bad" "$t_end")"
    res="$(cat "$dir/wrk.txt")"
    echo "scenario=$scenario proxy=$which $out ${res#BENCH_RESULT }" >>"$RAW"
    log "$scenario $which: $(tail -1 "$RAW")"
    stop_started "$p_pid"; stop_started "$s_pid"; stop_started "$c_pid"
  done
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/bad-canary-$STAMP.md"
{
  echo "# Bad canary ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- load: wrk $BENCH_THREADS thread(s), $BENCH_CONNECTIONS connections, ${DURATION}s; the canary (${BENCH_CANARY_PERCENT}% of users) goes bad at T = ${AT}s"
  echo "- fail500: the canary answers 500 from T; reset: it closes every connection without an answer from T"
  echo "- Kanaria route extra config: ${BENCH_KANARIA_ROUTE_EXTRA:-(none)}"
  echo
  python3 "$BENCH_DIR/report.py" canary "$RAW"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/bad-canary-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
