#!/usr/bin/env bash
# CPU per request measured in ways a busy machine does not move much, for A/B runs of small
# changes: a fixed number of requests (h2load -n BENCH_IR_REQUESTS) through each proxy,
# measured twice:
#   - natively, under `perf stat`: system calls per request (raw_syscalls:sys_enter) and the
#     proxy's task-clock per request;
#   - under valgrind's callgrind: user-space instructions per request (Ir), counters zeroed
#     after a warm-up and read after the measured requests. Every thread of the process
#     counts (Kanaria's controller and admin threads too); kernel work does not.
# BENCH_IR_ROUNDS rounds alternate the proxies; medians are reported, with the spread of the
# instruction counts. Proxies as in load.sh (BENCH_IR_PROXIES, default "kanaria bare nginx"; bare:FLAGS and
# kanaria:PATH variants work). nginx runs with `master_process off` under valgrind (one
# process to count). Prints a markdown table and writes it to bench/results/.
source "$(dirname "$0")/lib.sh"
need_tools
command -v valgrind >/dev/null 2>&1 || die "valgrind missing (apt-get install valgrind)"
command -v h2load >/dev/null 2>&1 || die "h2load missing (apt-get install nghttp2-client)"
command -v perf >/dev/null 2>&1 || die "perf missing (apt-get install linux-perf)"
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/kanaria-bench-ir.XXXXXX)"
PROXIES="${BENCH_IR_PROXIES:-kanaria bare nginx}"
REQUESTS="${BENCH_IR_REQUESTS:-20000}"
WARM="${BENCH_IR_WARMUP:-2000}"
CONNS="${BENCH_IR_CONNECTIONS:-$BENCH_CONNECTIONS}"
ROUNDS="${BENCH_IR_ROUNDS:-1}"
# BENCH_IR_H2C=1: the clients speak HTTP/2 with prior knowledge (h2load's default; Kanaria
# with `[proxy] h2c = true`), for changes to the HTTP/2 path; the floor speaks HTTP/1 only.
if [ "${BENCH_IR_H2C:-0}" = 1 ]; then
  H2LOAD_PROTO=()
  PROTO_NAME="h2c"
  export BENCH_KANARIA_PROXY="h2c = true" NGINX_LISTEN_FLAGS="http2"
else
  H2LOAD_PROTO=(--h1)
  PROTO_NAME="--h1"
fi

S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
CONDITIONS="$(conditions)"

# h2load (HTTP/1.1 or h2c, one thread, $CONNS connections) sends exactly $2 requests, every one
# with the same `x-user-id` (h2load cannot vary a header; the split costs the same for any
# user); prints `requests=N`.
run_fixed() {
  local url="$1" n="$2" out
  out="$(timeout 900 h2load "${H2LOAD_PROTO[@]}" -t 1 -c "$CONNS" -n "$n" -H "x-user-id: user-48213" "$url" 2>&1)" ||
    die "h2load failed: $out"
  awk '/^requests:/ {print "requests=" $8}' <<<"$out" | grep -q "requests=$n" ||
    die "not all requests succeeded: $(grep -E '^(requests|status codes):' <<<"$out")"
  echo "requests=$n"
}

RAW="$WORK/raw.txt"
: >"$RAW"
for round in $(seq 1 "$ROUNDS"); do
for which in $PROXIES; do
  dir="$WORK/native-$which-$round"
  mkdir -p "$dir"
  port="$(free_port)"
  start_proxy "$which" "$port" "$dir" "$S_PORT" "$C_PORT"
  pid="$LAST_PID"
  url="http://127.0.0.1:$port/"
  run_fixed "$url" "$WARM" >/dev/null
  pids="$(pid_tree "$pid" | tr ' ' ',')"
  perf stat -x, -e raw_syscalls:sys_enter,task-clock -p "$pids" -o "$dir/perf.txt" &
  perf_pid=$!
  sleep 0.2 # perf attaches asynchronously; nothing to poll for
  res="$(run_fixed "$url" "$REQUESTS")"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  stop_started "$pid"
  sys="$(awk -F, '$3 == "raw_syscalls:sys_enter" {print $1}' "$dir/perf.txt")"
  clock="$(awk -F, '$3 == "task-clock" {print $1}' "$dir/perf.txt")"
  reqs="${res#requests=}"

  dir="$WORK/callgrind-$which-$round"
  mkdir -p "$dir"
  port="$(free_port)"
  wrap=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" --dump-line=no)
  PROXY_WRAP=("${wrap[@]}")
  # nginx: master and worker in one process, so one process is counted.
  WAIT_POLLS=1200 NGINX_EXTRA="master_process off;" start_proxy "$which" "$port" "$dir" "$S_PORT" "$C_PORT"
  PROXY_WRAP=()
  pid="$LAST_PID"
  url="http://127.0.0.1:$port/"
  run_fixed "$url" "$WARM" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  res_ir="$(run_fixed "$url" "$REQUESTS")"
  callgrind_control -d "$pid" >/dev/null 2>&1
  # The dump after the measured requests is the newest file: its totals line is Ir.
  dump="$(ls -t "$dir"/callgrind.out* | head -1)"
  ir="$(awk '/^totals:/ {print $2}' "$dump")"
  # BENCH_IR_KEEP=DIR keeps each measured dump for `callgrind_annotate --inclusive=yes`.
  if [ -n "${BENCH_IR_KEEP:-}" ]; then
    mkdir -p "$BENCH_IR_KEEP"
    cp "$dump" "$BENCH_IR_KEEP/callgrind-${which//[:\/]/_}-$round.out"
  fi
  stop_started "$pid"
  reqs_ir="${res_ir#requests=}"
  echo "proxy=$which round=$round requests=$reqs syscalls=$sys task_clock_ms=$clock ir_requests=$reqs_ir ir=$ir" >>"$RAW"
  log "$which: $(tail -1 "$RAW")"
done
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/instructions-$STAMP.md"
{
  echo "# CPU per request, fixed request count ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- $ROUNDS round(s) alternating, medians; $REQUESTS requests after $WARM warm-up requests, h2load $PROTO_NAME, 1 thread, $CONNS connections, one user id, ${BENCH_CANARY_PERCENT}% canary; one worker each"
  echo
  python3 "$BENCH_DIR/report.py" instructions "$RAW"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/instructions-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
