-- wrk script for bench/memory.sh: cycles over every route (BENCH_MEM_ROUTES of them: "/"
-- for the first, "/rN/" for route rN) and both versions, forced with the route's override
-- header, so the analysis windows, in-flight rings and series of both tracks of every
-- route are written. Stops after BENCH_MEM_MAX responses (0: only the -d duration bounds it).
-- done() prints one `BENCH_RESULT key=value ...` line that bench/lib.sh parses.

local reqs = {}
local n = 0
local i = 0
local max = 0
local seen = 0

function init(args)
  local routes = tonumber(os.getenv("BENCH_MEM_ROUTES") or "1")
  for k = 0, routes - 1 do
    local path = "/"
    if k > 0 then path = "/r" .. k .. "/" end
    for _, version in ipairs({ "stable", "canary" }) do
      reqs[#reqs + 1] = wrk.format("GET", path,
        { ["x-user-id"] = "mem-" .. k, ["x-kanaria-version"] = version })
    end
  end
  n = #reqs
  -- Threads share the budget equally.
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  max = math.ceil(tonumber(os.getenv("BENCH_MEM_MAX") or "0") / threads)
  -- Threads start at different places so all of them do not hit the same route at once.
  i = math.random(0, n - 1)
end

function request()
  i = i % n + 1
  return reqs[i]
end

function response(status, headers, body)
  seen = seen + 1
  if max > 0 and seen >= max then
    wrk.thread:stop()
  end
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
