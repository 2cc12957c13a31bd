#!/usr/bin/env bash
# Memory per held client connection (issue 23): each proxy of BENCH_HELD_PROXIES (default
# Kanaria, the bare-Pingora floor and nginx) is started fresh for every count of
# BENCH_HELD (default 1000 10000 30000); bench/hold.py opens that many client connections
# to it, makes one request on each (a distinct x-user-id; at most BENCH_HELD_PARALLEL being
# opened at once) and holds them all open and idle. Once they are held (and
# BENCH_HELD_SETTLE seconds later) the proxy's RSS is read: VmRSS summed over its process
# tree (nginx: master + worker). Also read: RSS once ready before the client, open
# descriptors, and how many held connections the proxy closed meanwhile. The slope (KiB per
# held connection) is a least-squares line through the held points. Kanaria runs its default
# config (lib.sh) except `[edge] max_connections`, raised above the largest count when that
# is over the default 10,000 (it also sizes the upstream keep-alive pool); nginx runs one
# worker with `keepalive BENCH_HELD_NGINX_KEEPALIVE` (default 10000, as in the issue) per
# upstream and enough worker_connections. The descriptor limit is raised for this script
# and the processes it starts only (`ulimit -n`), never system-wide; counts that do not fit
# under the limit are skipped (and said so). BENCH_HELD_H2C=1 holds HTTP/2 connections
# (prior knowledge, one GET each) instead: Kanaria with `[proxy] h2c = true`, nginx with
# `listen ... http2`, and the floor left out by default (it speaks HTTP/1 only). Prints a
# markdown table and writes it to bench/results/.
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/kanaria-bench-held.XXXXXX)"
COUNTS="${BENCH_HELD:-1000 10000 30000}"
H2C="${BENCH_HELD_H2C:-0}"
if [ "$H2C" = 1 ]; then
  PROXIES="${BENCH_HELD_PROXIES:-kanaria nginx}"
  export BENCH_KANARIA_PROXY="h2c = true" NGINX_LISTEN_FLAGS="http2"
  HOLD_FLAGS=(--h2c)
  CURL_FLAGS=(--http2-prior-knowledge)
else
  PROXIES="${BENCH_HELD_PROXIES:-kanaria bare nginx}"
  HOLD_FLAGS=()
  CURL_FLAGS=()
fi
PARALLEL="${BENCH_HELD_PARALLEL:-100}"
SETTLE="${BENCH_HELD_SETTLE:-2}"
HOLD_MAX="${BENCH_HELD_HOLD:-120}"
NGINX_KEEPALIVE="${BENCH_HELD_NGINX_KEEPALIVE:-10000}"

MAXN=0
for n in $COUNTS; do ((n > MAXN)) && MAXN=$n; done
# Each held connection costs a descriptor in the client and one in the proxy (the upstream
# side is pooled: at most about PARALLEL more). Client and proxy are separate processes, so
# the per-process limit has to cover the largest count plus headroom.
WANT=$((MAXN + PARALLEL + 1024))
HARD_BEFORE="$(ulimit -Hn)"
if [ "$HARD_BEFORE" != unlimited ] && ((HARD_BEFORE < WANT)); then
  ulimit -Hn "$WANT" 2>/dev/null || log "hard descriptor limit $HARD_BEFORE cannot be raised to $WANT here (raising it needs CAP_SYS_RESOURCE)"
fi
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
LIMIT="$(ulimit -n)"
# A count over the limit is replaced by the largest that fits (whole thousands), once.
FIT=()
CLAMPED=""
for n in $COUNTS; do
  if [ "$LIMIT" = unlimited ] || ((n + PARALLEL + 1024 <= LIMIT)); then FIT+=("$n"); else
    m=$(((LIMIT - PARALLEL - 1024) / 1000 * 1000))
    log "$n held connections do not fit under the descriptor limit $LIMIT (hard limit before the bench: $HARD_BEFORE): $m instead"
    CLAMPED="$CLAMPED $n→$m"
    if ((m > 0)) && [[ " ${FIT[*]} " != *" $m "* ]]; then FIT+=("$m"); fi
  fi
done
((${#FIT[@]})) || die "no count fits under the descriptor limit $LIMIT"
log "descriptor limit for this run: $LIMIT (hard limit outside it: $HARD_BEFORE)"

if ((MAXN >= 10000)); then export BENCH_KANARIA_EDGE="max_connections = $((MAXN + 1000))"; fi
export NGINX_UPSTREAM_KEEPALIVE="$NGINX_KEEPALIVE"
export NGINX_WORKER_CONNECTIONS=$((MAXN + NGINX_KEEPALIVE + 2048))
export NGINX_EXTRA="worker_rlimit_nofile $LIMIT;"

S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
CONDITIONS="$(conditions)"

# Resident set in KiB: VmRSS summed over the process tree.
tree_rss_kb() {
  local total=0 p k
  for p in $(pid_tree "$1"); do
    k="$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)" || k=0
    total=$((total + ${k:-0}))
  done
  echo "$total"
}
tree_fds() {
  local total=0 p
  for p in $(pid_tree "$1"); do total=$((total + $(ls "/proc/$p/fd" 2>/dev/null | wc -l))); done
  echo "$total"
}

RAW="$WORK/raw.txt"
: >"$RAW"
for n in "${FIT[@]}"; do
  for proxy in $PROXIES; do
    dir="$WORK/$proxy-$n"
    mkdir -p "$dir"
    port="$(free_port)"
    start_proxy "$proxy" "$port" "$dir" "$S_PORT" "$C_PORT"
    pid="$LAST_PID"
    curl -s -o /dev/null --noproxy '*' "${CURL_FLAGS[@]}" -H 'x-user-id: warm' "http://127.0.0.1:$port/" || die "$proxy does not answer"
    sleep 0.5
    ready="$(tree_rss_kb "$pid")"
    python3 "$BENCH_DIR/hold.py" "${HOLD_FLAGS[@]}" --port "$port" --count "$n" --parallel "$PARALLEL" \
      --hold "$HOLD_MAX" --ready-file "$dir/held.ready" >"$dir/hold.out" 2>&1 &
    cpid=$!
    STARTED_PIDS+=("$cpid")
    for _ in $(seq 1 $((HOLD_MAX * 10))); do
      [ -s "$dir/held.ready" ] && break
      kill -0 "$cpid" 2>/dev/null || break
      sleep 0.1
    done
    [ -s "$dir/held.ready" ] || die "client did not get to hold $n connections to $proxy: $(cat "$dir/hold.out")"
    sleep "$SETTLE"
    rss="$(tree_rss_kb "$pid")"
    hwm="$(peak_rss_kb "$pid")"
    fds="$(tree_fds "$pid")"
    kill -TERM "$cpid" 2>/dev/null || true
    wait "$cpid" 2>/dev/null || true
    stop_started "$cpid"
    closed="$(sed -n 's/.*closed_by_peer=\([0-9]*\).*/\1/p' "$dir/hold.out")"
    stop_started "$pid"
    echo "proxy=$proxy n=$n ready_kb=$ready rss_kb=$rss peak_kb=$hwm fds=$fds closed_by_peer=${closed:-?} $(cat "$dir/held.ready")" >>"$RAW"
    log "$(tail -1 "$RAW")"
  done
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/held-$STAMP.md"
{
  echo "# Memory per held client connection ($STAMP)$([ "$H2C" = 1 ] && echo ", HTTP/2 (h2c)")"
  echo
  echo "$CONDITIONS"
  echo "- each proxy started fresh per count, one worker; bench/hold.py opens the connections ($PARALLEL at a time), one GET each, then holds them idle; RSS (VmRSS summed over the process tree) ${SETTLE}s after all are held; descriptor limit $LIMIT in this run (hard limit outside it: $HARD_BEFORE)"
  [ -z "$CLAMPED" ] || echo "- counts replaced by the largest that fits under the descriptor limit (each held connection takes one in the client and one in the proxy):$CLAMPED"
  echo "- Kanaria: default config of lib.sh${BENCH_KANARIA_EDGE:+, \`[edge] $BENCH_KANARIA_EDGE\`}; nginx: \`keepalive $NGINX_KEEPALIVE\` per upstream, \`worker_connections $NGINX_WORKER_CONNECTIONS\`"
  echo
  python3 - "$RAW" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in open(sys.argv[1])]
names = {"kanaria": "Kanaria", "bare": "bare Pingora (floor)", "nginx": "nginx"}
proxies = list(dict.fromkeys(r["proxy"] for r in rows))
counts = sorted({int(r["n"]) for r in rows})
def mib(kb): return f"{int(kb) / 1024:.1f}"
print("| proxy | ready MiB | " + " | ".join(f"{n:,} held MiB" for n in counts) + " | KiB / held connection (fit) | closed by proxy | failed |")
print("| --- | ---: | " + " | ".join("---:" for _ in counts) + " | ---: | ---: | ---: |")
slopes = {}
for p in proxies:
    rs = {int(r["n"]): r for r in rows if r["proxy"] == p}
    xs = sorted(rs)
    ys = [int(rs[x]["rss_kb"]) for x in xs]
    if len(xs) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    else:
        slope = (ys[0] - int(rs[xs[0]]["ready_kb"])) / xs[0]
    slopes[p] = slope
    ready = sorted(int(r["ready_kb"]) for r in rs.values())[len(rs) // 2]
    cells = " | ".join(mib(rs[n]["rss_kb"]) if n in rs else "—" for n in counts)
    closed = sum(int(r["closed_by_peer"]) for r in rs.values() if r["closed_by_peer"].isdigit())
    failed = sum(int(r["failed"]) for r in rs.values())
    print(f"| {names.get(p, p)} | {mib(ready)} | {cells} | {slope:.2f} | {closed} | {failed} |")
print()
print("Per point, (RSS held − RSS ready) / held, KiB:")
print()
print("| proxy | " + " | ".join(f"{n:,}" for n in counts) + " |")
print("| --- | " + " | ".join("---:" for _ in counts) + " |")
for p in proxies:
    rs = {int(r["n"]): r for r in rows if r["proxy"] == p}
    print(f"| {names.get(p, p)} | " + " | ".join(
        f"{(int(rs[n]['rss_kb']) - int(rs[n]['ready_kb'])) / n:.2f}" if n in rs else "—" for n in counts) + " |")
if "kanaria" in slopes and "nginx" in slopes:
    print()
    rk = {int(r["n"]): int(r["rss_kb"]) for r in rows if r["proxy"] == "kanaria"}
    rn = {int(r["n"]): int(r["rss_kb"]) for r in rows if r["proxy"] == "nginx"}
    both = [n for n in counts if n in rk and n in rn]
    print("| ratio | " + " | ".join(f"{n:,}" for n in both) + " | slope |")
    print("| --- | " + " | ".join("---:" for _ in both) + " | ---: |")
    print("| Kanaria / nginx RSS | " + " | ".join(f"{rk[n] / rn[n]:.2f}" for n in both) + f" | {slopes['kanaria'] / slopes['nginx']:.2f} |")
    if "bare" in slopes:
        rb = {int(r["n"]): int(r["rss_kb"]) for r in rows if r["proxy"] == "bare"}
        print("| Kanaria / floor RSS | " + " | ".join(f"{rk[n] / rb[n]:.2f}" if n in rb else "—" for n in both) + f" | {slopes['kanaria'] / slopes['bare']:.2f} |")
    if 10000 in rk and 10000 in rn:
        r = rk[10000] / rn[10000]
        print()
        print(f"Target (issue 23): Kanaria's RSS at 10,000 held connections ≤ 2× nginx's: {'met' if r <= 2 else '**not met**'} ({r:.2f}×).")
PY
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/held-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
