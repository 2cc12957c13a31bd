#!/usr/bin/env bash
# Hot reload under load: 100 config rewrites (the canary weight flipping between 10% and
# 20%) while wrk runs, for Kanaria (file watch; each rewrite waits until the new generation
# is live), nginx (`nginx -s reload`) and HAProxy (master-worker reload, SIGUSR2, with
# `expose-fd listeners` and `idle-close-on-response`). Reports failed requests and latency
# during the reloads. Knobs: BENCH_RELOAD_DURATION (default 20 s), BENCH_RELOADS (100).
source "$(dirname "$0")/lib.sh"
need_tools
mkdir -p "$RESULTS_DIR"
DURATION="${BENCH_RELOAD_DURATION:-20}"
RELOADS="${BENCH_RELOADS:-100}"
PROXIES="${BENCH_PROXIES:-kanaria nginx haproxy}"
WORK="$(mktemp -d /tmp/kanaria-bench.XXXXXX)"
CONDITIONS="$(conditions)"
RAW="$WORK/raw.txt"
: >"$RAW"
S_PORT="$(free_port)"
C_PORT="$(free_port)"
start_upstream stable "$S_PORT" "$WORK"
start_upstream canary "$C_PORT" "$WORK"
# Spread the reloads over the run, leaving a second at each end.
INTERVAL="$(python3 -c "print(max(0.01, ($DURATION - 2) / $RELOADS))")"

generation() {
  curl -s --noproxy '*' "http://127.0.0.1:$1/api/v1/status" | grep -o '"config_generation":[0-9]*' | cut -d: -f2
}

for which in $PROXIES; do
  dir="$WORK/$which"
  mkdir -p "$dir"
  port="$(free_port)"
  start_proxy "$which" "$port" "$dir" "$S_PORT" "$C_PORT"; pid="$LAST_PID"
  run_wrk "http://127.0.0.1:$port/" 1 >/dev/null
  run_wrk "http://127.0.0.1:$port/" "$DURATION" >"$dir/wrk.txt" &
  wrk_pid=$!
  sleep 1
  done_reloads=0
  for i in $(seq 1 "$RELOADS"); do
    pct=$((i % 2 ? 20 : 10))
    case "$which" in
      kanaria)
        admin="$(cat "$dir/kanaria.admin_port")"
        before="$(generation "$admin")"
        kanaria_config "$port" "$admin" "$dir" "$S_PORT" "$C_PORT" "$pct" >"$dir/kanaria.toml.new"
        mv "$dir/kanaria.toml.new" "$dir/kanaria.toml"
        for _ in $(seq 1 200); do
          [ "$(generation "$admin")" -gt "$before" ] && break
          sleep 0.01
        done
        ;;
      nginx)
        nginx_proxy_config "$port" "$dir" "$S_PORT" "$C_PORT" "$pct" >"$dir/proxy.nginx.conf"
        nginx -p "$dir" -c "$dir/proxy.nginx.conf" -e "$dir/proxy.nginx.error.log" -s reload
        ;;
      haproxy)
        haproxy_config "$port" "$dir" "$S_PORT" "$C_PORT" "$pct" >"$dir/haproxy.cfg"
        kill -USR2 "$pid"
        ;;
    esac
    done_reloads=$((done_reloads + 1))
    sleep "$INTERVAL"
  done
  if [ "$which" = kanaria ]; then
    done_reloads=$(($(generation "$(cat "$dir/kanaria.admin_port")") - 1))
  fi
  wait "$wrk_pid" || die "wrk failed"
  res="$(cat "$dir/wrk.txt")"
  echo "proxy=$which reloads=$done_reloads ${res#BENCH_RESULT }" >>"$RAW"
  log "$which: $(tail -1 "$RAW")"
  stop_started "$pid"
done

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$RESULTS_DIR/reload-$STAMP.md"
{
  echo "# Hot reload under load ($STAMP)"
  echo
  echo "$CONDITIONS"
  echo "- load: wrk $BENCH_THREADS thread(s), $BENCH_CONNECTIONS connections, ${DURATION}s; $RELOADS config rewrites + reloads, one every ${INTERVAL}s"
  echo "- reloads: Kanaria counts publications it made (generation - 1); nginx and HAProxy count reload commands sent"
  echo
  python3 "$BENCH_DIR/report.py" reload "$RAW"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
cp "$RAW" "$RESULTS_DIR/reload-$STAMP.raw.txt"
cleanup_all
rm -rf "$WORK"
