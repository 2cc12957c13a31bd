#!/usr/bin/env bash
# Comparative load: direct to the upstream (the ceiling), Kanaria, the bare-Pingora floor
# (examples/bare_pingora.rs), nginx and HAProxy, each with one worker (`NAME@N`: N workers)
# and the same 10% user split, under the same wrk load. Rounds alternate the
# proxies (A B C A B C ...) so machine drift hits all alike; each round starts the proxy
# fresh, warms it up, then measures requests/s, latency percentiles, CPU seconds per 100k
# requests, peak RSS and the upstream connections opened during the measured run (0 when
# keep-alive holds). Prints a markdown table of the medians and writes it to
# bench/results/. Knobs: BENCH_DURATION, BENCH_CONNECTIONS, BENCH_THREADS, BENCH_ROUNDS,
# BENCH_WARMUP (see bench/README.md).
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/kanaria-bench.XXXXXX)"
PROXIES="${BENCH_PROXIES:-direct kanaria kanaria-nolog bare nginx haproxy}"

S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
log "upstreams: stable 127.0.0.1:$S_PORT, canary 127.0.0.1:$C_PORT; work dir $WORK"
CONDITIONS="$(conditions)"

RAW="$WORK/raw.txt"
: >"$RAW"
for round in $(seq 1 "$BENCH_ROUNDS"); do
  for which in $PROXIES; do
    dir="$WORK/$which-$round"
    mkdir -p "$dir"
    if [ "$which" = direct ]; then
      url="http://127.0.0.1:$S_PORT/"
      pid=""
    else
      port="$(free_port)"
      start_proxy "$which" "$port" "$dir" "$S_PORT" "$C_PORT"
      pid="$LAST_PID"
      url="http://127.0.0.1:$port/"
    fi
    run_wrk "$url" "$BENCH_WARMUP" >/dev/null
    cpu0=0
    [ -z "$pid" ] || cpu0="$(cpu_seconds "$pid")"
    acc0=$(($(upstream_accepts "$WORK" stable) + $(upstream_accepts "$WORK" canary)))
    res="$(run_wrk "$url" "$BENCH_DURATION")"
    acc1=$(($(upstream_accepts "$WORK" stable) + $(upstream_accepts "$WORK" canary)))
    cpu1=0 rss=0
    if [ -n "$pid" ]; then
      cpu1="$(cpu_seconds "$pid")"
      rss="$(peak_rss_kb "$pid")"
      stop_started "$pid"
    fi
    echo "proxy=$which round=$round cpu=$(python3 -c "print($cpu1 - $cpu0)") rss_kb=$rss upstream_conns=$((acc1 - acc0 - 2)) ${res#BENCH_RESULT }" >>"$RAW"
    log "round $round $which: $(tail -1 "$RAW")"
  done
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/load-$STAMP.md"
python3 "$BENCH_DIR/report.py" load "$RAW" >"$WORK/table.md"
{
  echo "# Load: Kanaria vs nginx vs HAProxy ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- load: wrk $BENCH_THREADS thread(s), $BENCH_CONNECTIONS connections, ${BENCH_DURATION}s per round after ${BENCH_WARMUP}s warm-up, $BENCH_ROUNDS rounds alternating, $BENCH_USERS users, ${BENCH_CANARY_PERCENT}% canary; medians over rounds"
  echo "- each proxy: one worker (NAME@N: N); upstreams: nginx ($BENCH_UPSTREAM_WORKERS worker each) answering a 7-byte body"
  echo
  cat "$WORK/table.md"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/load-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
