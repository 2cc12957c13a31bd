# Shared pieces of the benchmark scripts (sourced, not run): tools, free ports, the nginx
# upstreams, the proxies under test (Kanaria, the bare-Pingora floor, nginx, HAProxy) with
# the same 10% user split, wrk runs and the CPU / RSS readings from /proc. Everything listens on 127.0.0.1 on OS-picked ports and is
# started by the script itself, which stops exactly the processes it started.

set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$BENCH_DIR/.." && pwd)"
RESULTS_DIR="${BENCH_RESULTS_DIR:-$BENCH_DIR/results}"

# Knobs (environment): see bench/README.md.
BENCH_DURATION="${BENCH_DURATION:-10}"        # seconds of measured load per round
BENCH_WARMUP="${BENCH_WARMUP:-2}"             # seconds of unmeasured load before each round
BENCH_CONNECTIONS="${BENCH_CONNECTIONS:-50}"  # wrk connections
BENCH_THREADS="${BENCH_THREADS:-1}"           # wrk threads
BENCH_ROUNDS="${BENCH_ROUNDS:-3}"             # rounds per proxy (median reported)
BENCH_USERS="${BENCH_USERS:-10000}"           # distinct x-user-id values
BENCH_CANARY_PERCENT="${BENCH_CANARY_PERCENT:-10}"
BENCH_UPSTREAM_WORKERS="${BENCH_UPSTREAM_WORKERS:-1}"
KANARIA_BIN="${KANARIA_BIN:-$REPO_DIR/target/release/kanaria}"
# The floor: examples/bare_pingora.rs (`cargo build --release --example bare_pingora`).
BARE_BIN="${BARE_BIN:-$REPO_DIR/target/release/examples/bare_pingora}"
# Extra TOML appended to Kanaria's [[routes]] table (e.g. health checks / rollback once
# they exist), so the bad-canary run can enable whatever the build supports.
# Kanaria's best setup for a bad canary: judge four times a second, with an absolute error
# limit beside the default relative rule (retry on stable is on by default).
BENCH_KANARIA_ROUTE_EXTRA="${BENCH_KANARIA_ROUTE_EXTRA:-[routes.analysis]
interval = \"250ms\"
max_error_rate = 0.05}"
export BENCH_USERS

CLK_TCK="$(getconf CLK_TCK)"
STARTED_PIDS=()
LAST_PID=""
# A command prefix for the proxy processes (bench/instructions.sh runs them under valgrind),
# and how many 50 ms polls a process gets to start listening.
PROXY_WRAP=()
WAIT_POLLS="${WAIT_POLLS:-300}"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs nginx, HAProxy and wrk with apt-get when missing (as root, or through sudo).
need_tools() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if ((${#missing[@]})); then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    command -v apt-get >/dev/null 2>&1 || die "install ${missing[*]} (no apt-get here)"
    log "installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  [ -x "$KANARIA_BIN" ] || die "$KANARIA_BIN missing: run 'cargo build --release' (make bench does)"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Polls until something accepts on 127.0.0.1:$1 (WAIT_POLLS times, 15 s by default).
wait_port() {
  local i
  for i in $(seq 1 "$WAIT_POLLS"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "nothing listens on 127.0.0.1:$1 after $((WAIT_POLLS / 20)) s"
}

# Polls an HTTP URL until it answers 200 (WAIT_POLLS times, 15 s by default).
wait_http() {
  local i
  for i in $(seq 1 "$WAIT_POLLS"); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --noproxy '*' "$1")" = 200 ]; then return 0; fi
    sleep 0.05
  done
  die "$1 not ready after $((WAIT_POLLS / 20)) s"
}

# Stops one process we started (and its children), then reaps it.
stop_pid() {
  local pid="$1" kids
  [ -n "$pid" ] || return 0
  kids="$(ps -o pid= --ppid "$pid" 2>/dev/null || true)"
  kill -INT "$pid" $kids 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" $kids 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup_all() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
  STARTED_PIDS=()
}
trap cleanup_all EXIT

# The process and its direct children (nginx: master + workers).
pid_tree() { echo "$1" $(ps -o pid= --ppid "$1" 2>/dev/null || true); }

# CPU seconds (user + system) used so far by a process tree.
cpu_seconds() {
  local total=0 p t
  for p in $(pid_tree "$1"); do
    # Fields 14 and 15 of /proc/PID/stat, after the ")" that ends the command name.
    t="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')" || t=0
    total=$((total + ${t:-0}))
  done
  python3 -c "print($total / $CLK_TCK)"
}

# Peak resident set size in KiB: the sum of VmHWM over the process tree.
peak_rss_kb() {
  local total=0 p k
  for p in $(pid_tree "$1"); do
    k="$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null)" || k=0
    total=$((total + ${k:-0}))
  done
  echo "$total"
}

# Runs wrk against a URL for $2 seconds; prints the BENCH_RESULT line of bench/user.lua.
run_wrk() {
  local url="$1" secs="$2" out
  out="$(timeout $((secs + 30)) wrk -t"$BENCH_THREADS" -c"$BENCH_CONNECTIONS" -d"${secs}s" \
    --timeout 5s -s "$BENCH_DIR/user.lua" "$url" 2>&1)" || die "wrk failed: $out"
  grep '^BENCH_RESULT' <<<"$out" || die "no result from wrk: $out"
}

# --- upstreams -------------------------------------------------------------------------
# An nginx answering a small static body. Touching $dir/$name.fail500 makes it answer 500,
# touching $dir/$name.reset makes it close connections without answering (nginx's 444).
# The canary logs "$msec $status" per request, to see when it stopped getting traffic.
start_upstream() {
  local name="$1" port="$2" dir="$3" access="access_log off;" status_port
  status_port="$(free_port)"
  echo "$status_port" >"$dir/$name.status_port"
  mkdir -p "$dir/$name-tmp"
  if [ "$name" = canary ]; then
    access="log_format ts '\$msec \$status'; access_log $dir/canary.access.log ts buffer=32k flush=100ms;"
  fi
  cat >"$dir/$name.nginx.conf" <<EOF
worker_processes $BENCH_UPSTREAM_WORKERS;
daemon off;
user root;
pid $dir/$name.nginx.pid;
error_log $dir/$name.nginx.error.log warn;
events { worker_connections 8192; }
http {
  $access
  client_body_temp_path $dir/$name-tmp/body;
  proxy_temp_path $dir/$name-tmp/proxy;
  fastcgi_temp_path $dir/$name-tmp/fastcgi;
  uwsgi_temp_path $dir/$name-tmp/uwsgi;
  scgi_temp_path $dir/$name-tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {
    listen 127.0.0.1:$port reuseport;
    default_type text/plain;
    location / {
      if (-f $dir/$name.fail500) { return 500 "$name failing\n"; }
      if (-f $dir/$name.reset) { return 444; }
      return 200 "$name\n";
    }
  }
  # Connection counters (accepts), on a port of their own: new upstream connections.
  server {
    listen 127.0.0.1:$status_port;
    location / { stub_status; }
  }
}
EOF
  nginx -p "$dir" -c "$dir/$name.nginx.conf" -e "$dir/$name.nginx.error.log" </dev/null >/dev/null 2>&1 &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
  wait_port "$port"
}

# Connections an upstream has accepted so far (nginx stub_status), this read included: two
# reads of one upstream differ by the new connections between them plus one.
upstream_accepts() {
  local dir="$1" name="$2"
  curl -s --noproxy '*' "http://127.0.0.1:$(cat "$dir/$name.status_port")/" | awk 'NR == 3 {print $1}'
}

# --- proxies under test ----------------------------------------------------------------
# Each gets one worker, the same 10% split on x-user-id and upstream keep-alive, and the
# best setup it has for a failing canary (written out below).

kanaria_config() {
  local port="$1" admin="$2" dir="$3" s="$4" c="$5" pct="$6" log="${KANARIA_ACCESS_LOG:-on}"
  if [ "$log" = on ]; then
    # The access log on, as an operator runs it: JSON lines to a file, off the request path.
    printf '[log]\naccess = "%s"\nformat = "json"\n\n' "$dir/kanaria.access.log"
  fi
  cat <<EOF
[proxy]
listen = "127.0.0.1:$port"
threads = ${PROXY_WORKERS:-1}
upgrade_sock = "$dir/kanaria-upgrade.sock"
shutdown_grace = "1s"
${BENCH_KANARIA_PROXY:-}

[admin]
listen = "127.0.0.1:$admin"

[reload]
debounce = "20ms"
EOF
  # BENCH_KANARIA_EDGE: keys of an [edge] table (held.sh: max_connections).
  if [ -n "${BENCH_KANARIA_EDGE:-}" ]; then
    printf '\n[edge]\n%s\n' "$BENCH_KANARIA_EDGE"
  fi
  kanaria_route app "" "$BENCH_KANARIA_ROUTE_EXTRA"$'\n' "$pct" "$s" "$c"
  # BENCH_ROUTES > 1: more routes of the same shape (the same analysis settings) on their own
  # path prefixes (memory.sh). BENCH_KANARIA_ROUTE_KEYS: more keys for every route.
  local i
  for ((i = 1; i < ${BENCH_ROUTES:-1}; i++)); do
    kanaria_route "r$i" "/r$i" "" "$pct" "$s" "$c"
  done
}

# One `[[routes]]` of Kanaria's bench config: NAME, PATH_PREFIX (empty: none), EXTRA lines
# after the route's keys, canary percent, stable and canary ports.
kanaria_route() {
  local name="$1" prefix="$2" extra="$3" pct="$4" s="$5" c="$6"
  printf '\n[[routes]]\nname = "%s"\n' "$name"
  if [ -n "$prefix" ]; then
    printf 'path_prefix = "%s"\n' "$prefix"
  fi
  cat <<EOF
sticky_by = ["header:x-user-id"]
canary_weight = $pct
${BENCH_KANARIA_ROUTE_KEYS:-}
$extra
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:$s"]

[routes.canary]
version = "v2"
endpoints = ["127.0.0.1:$c"]
EOF
}

# Split, metrics and analysis are always on in Kanaria (metrics and windows are recorded
# for every request), and so is its access log (JSON lines to a file): `kanaria-nolog`
# runs the same without it, to show what the log costs. Builds named by path
# (`kanaria:PATH`, e.g. an older one) run without `[log]`, which they may not know.
start_kanaria() {
  local port="$1" dir="$2" s="$3" c="$4" admin
  admin="$(free_port)"
  echo "$admin" >"$dir/kanaria.admin_port"
  kanaria_config "$port" "$admin" "$dir" "$s" "$c" "$BENCH_CANARY_PERCENT" >"$dir/kanaria.toml"
  RUST_LOG="${RUST_LOG:-warn}" "${PROXY_WRAP[@]}" "$KANARIA_BIN" run -c "$dir/kanaria.toml" </dev/null >/dev/null 2>"$dir/kanaria.log" &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
  wait_http "http://127.0.0.1:$admin/readyz"
}

# nginx: split_clients on the user header; upstream keep-alive; for a failing canary the
# canary upstream has the stable server as `backup`, `max_fails=1 fail_timeout=30s`, and
# proxy_next_upstream retries errors, timeouts and 5xx on it (GETs are idempotent).
nginx_proxy_config() {
  local port="$1" dir="$2" s="$3" c="$4" pct="$5"
  cat <<EOF
worker_processes ${PROXY_WORKERS:-1};
daemon off;
${NGINX_EXTRA:-}
user root;
pid $dir/proxy.nginx.pid;
error_log $dir/proxy.nginx.error.log warn;
events { worker_connections ${NGINX_WORKER_CONNECTIONS:-8192}; }
http {
  access_log off;
  client_body_temp_path $dir/proxy-tmp/body;
  proxy_temp_path $dir/proxy-tmp/proxy;
  fastcgi_temp_path $dir/proxy-tmp/fastcgi;
  uwsgi_temp_path $dir/proxy-tmp/uwsgi;
  scgi_temp_path $dir/proxy-tmp/scgi;
  keepalive_requests 1000000;
  split_clients "\${http_x_user_id}" \$pool {
    $pct% canary;
    * stable;
  }
  upstream stable {
    server 127.0.0.1:$s max_fails=1 fail_timeout=30s;
    keepalive ${NGINX_UPSTREAM_KEEPALIVE:-128};
  }
  upstream canary {
    server 127.0.0.1:$c max_fails=1 fail_timeout=30s;
    server 127.0.0.1:$s backup;
    keepalive ${NGINX_UPSTREAM_KEEPALIVE:-128};
  }
  server {
    listen 127.0.0.1:$port${NGINX_LISTEN_FLAGS:+ $NGINX_LISTEN_FLAGS};
    location / {
      proxy_pass http://\$pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_next_upstream error timeout invalid_header http_500 http_502 http_503 http_504;
      proxy_next_upstream_tries 2;
      proxy_connect_timeout 2s;
      proxy_read_timeout 30s;
      add_header x-version \$pool;
    }
  }
}
EOF
}

start_nginx_proxy() {
  local port="$1" dir="$2" s="$3" c="$4"
  mkdir -p "$dir/proxy-tmp"
  nginx_proxy_config "$port" "$dir" "$s" "$c" "$BENCH_CANARY_PERCENT" >"$dir/proxy.nginx.conf"
  "${PROXY_WRAP[@]}" nginx -p "$dir" -c "$dir/proxy.nginx.conf" -e "$dir/proxy.nginx.error.log" </dev/null >/dev/null 2>&1 &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
  wait_port "$port"
}

# HAProxy 2.6: one thread; the user header hashed (xxh32) into 100 buckets, < pct goes to
# the canary backend; server-side keep-alive (http-reuse always). For a failing canary:
# `observe layer7 error-limit 1 on-error mark-down` takes the canary server out on its first
# error, the stable server is its `backup`, `retry-on` with `option redispatch` resends a
# failed request (GET) to the other server, health checks keep a bad canary down, and
# `idle-close-on-response` keeps idle client connections open through a reload.
haproxy_config() {
  local port="$1" dir="$2" s="$3" c="$4" pct="$5"
  cat <<EOF
global
  nbthread ${PROXY_WORKERS:-1}
  maxconn 4000
  pidfile $dir/haproxy.pid
  stats socket $dir/haproxy.sock mode 600 level admin expose-fd listeners

defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 75s
  option http-keep-alive
  option idle-close-on-response
  http-reuse always
  retries 2
  option redispatch 1
  retry-on all-retryable-errors 500 502 503 504

frontend fe
  bind 127.0.0.1:$port
  option forwardfor
  http-request set-var(txn.bucket) req.hdr(x-user-id),xxh32,mod(100)
  use_backend canary if { var(txn.bucket) -m int lt $pct }
  default_backend stable

backend stable
  server s1 127.0.0.1:$s

backend canary
  option httpchk GET /
  default-server inter 1s fall 1 rise 3
  server c1 127.0.0.1:$c check observe layer7 error-limit 1 on-error mark-down
  server s1 127.0.0.1:$s backup
EOF
}

start_haproxy() {
  local port="$1" dir="$2" s="$3" c="$4"
  haproxy_config "$port" "$dir" "$s" "$c" "$BENCH_CANARY_PERCENT" >"$dir/haproxy.cfg"
  # -W: master-worker, so a reload (SIGUSR2 to the master) hands the listeners over.
  haproxy -W -db -f "$dir/haproxy.cfg" </dev/null >"$dir/haproxy.log" 2>&1 &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
  wait_port "$port"
}

# The bare-Pingora floor (examples/bare_pingora.rs): Kanaria's Pingora settings, the same
# split on x-user-id in upstream_peer, nothing else. $5... are extra flags (A/B runs).
start_bare() {
  local port="$1" dir="$2" s="$3" c="$4"
  shift 4
  [ -x "$BARE_BIN" ] || die "$BARE_BIN missing: run 'cargo build --release --example bare_pingora' (make bench does)"
  RUST_LOG="${RUST_LOG:-warn}" "${PROXY_WRAP[@]}" "$BARE_BIN" --listen "127.0.0.1:$port" --stable "127.0.0.1:$s" \
    --canary "127.0.0.1:$c" --percent "$BENCH_CANARY_PERCENT" --threads "${PROXY_WORKERS:-1}" "$@" \
    </dev/null >/dev/null 2>"$dir/bare.log" &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
  wait_port "$port"
}

# Starts one proxy by name; its pid is left in LAST_PID. A name ending in @N runs N
# workers (threads or worker processes) instead of one: `kanaria@2`, `nginx@2`.
start_proxy() {
  local which="$1" port="$2" dir="$3" s="$4" c="$5" flags=()
  PROXY_WORKERS=1
  if [[ "$which" == *@* ]]; then
    PROXY_WORKERS="${which##*@}"
    which="${which%@*}"
  fi
  case "$which" in
    kanaria) start_kanaria "$port" "$dir" "$s" "$c" ;;
    kanaria-nolog) KANARIA_ACCESS_LOG=off start_kanaria "$port" "$dir" "$s" "$c" ;;
    # kanaria-shadow: kanaria-nolog with a dark launch mirroring every stable user's
    # requests to the canary (shadow.sh: what it costs against kanaria-nolog).
    kanaria-shadow)
      KANARIA_ACCESS_LOG=off BENCH_KANARIA_ROUTE_EXTRA=$'[routes.shadow]\nshare = 100\nqueue = 100000' \
        start_kanaria "$port" "$dir" "$s" "$c" ;;
    # kanaria:PATH runs another build, for before/after comparisons in one run.
    kanaria:*) KANARIA_ACCESS_LOG=off KANARIA_BIN="${which#kanaria:}" start_kanaria "$port" "$dir" "$s" "$c" ;;
    bare) start_bare "$port" "$dir" "$s" "$c" ;;
    # bare=PATH runs another build of the floor (before/after a Pingora patch).
    bare=*) BARE_BIN="${which#bare=}" start_bare "$port" "$dir" "$s" "$c" ;;
    # bare:FLAG,FLAG runs the floor with flags of examples/bare_pingora.rs (A/B of one
    # Pingora setting), e.g. bare:--work-stealing=true or bare:--pingora-defaults.
    bare:*) IFS=, read -r -a flags <<<"${which#bare:}"; start_bare "$port" "$dir" "$s" "$c" "${flags[@]}" ;;
    nginx) start_nginx_proxy "$port" "$dir" "$s" "$c" ;;
    haproxy) start_haproxy "$port" "$dir" "$s" "$c" ;;
    *) die "unknown proxy $which" ;;
  esac
}

# Stops a proxy (or upstream) started above and forgets it.
stop_started() {
  local pid="$1" keep=() p
  stop_pid "$pid"
  for p in "${STARTED_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  STARTED_PIDS=("${keep[@]}")
}

# "key=value key=value" -> value of key.
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k {print $2}'; }

conditions() {
  echo "- host: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- versions: kanaria $("$KANARIA_BIN" --version | awk '{print $2}'), $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')"
}
