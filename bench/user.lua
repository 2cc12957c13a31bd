-- wrk script for the Kanaria benchmarks: every request carries an `x-user-id` header drawn
-- from BENCH_USERS ids (default 10000), so a proxy splitting on that header sends ~10% of
-- users to the canary. Requests are prebuilt in init(): the Lua cost per request is a table
-- lookup, the same for every proxy under test.
-- done() prints one `BENCH_RESULT key=value ...` line that bench/lib.sh parses.

local reqs = {}
local n = 0
local i = 0

function init(args)
  local users = tonumber(os.getenv("BENCH_USERS") or "10000")
  local path = os.getenv("BENCH_PATH") or "/"
  -- Each wrk thread starts at a different offset so threads do not move in lockstep.
  local offset = math.random(0, users - 1)
  for k = 0, users - 1 do
    local id = "user-" .. ((k + offset) % users)
    reqs[k + 1] = wrk.format("GET", path, { ["x-user-id"] = id })
  end
  n = users
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
