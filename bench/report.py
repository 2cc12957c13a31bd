#!/usr/bin/env python3
"""Turns the raw lines of the benchmark scripts into markdown tables.

    report.py load RAW          medians per proxy, ratios Kanaria/nginx and /HAProxy, targets
    report.py canary RAW        bad-canary runs: client errors, when the canary got no traffic
    report.py reload RAW        reload runs: failed requests and p99 during reloads
    report.py canary-out LOG T  seconds from T until the canary's traffic stopped (see below)

RAW lines are `key=value` pairs separated by spaces (written by load.sh, bad_canary.sh,
reload.sh from wrk's BENCH_RESULT line and /proc readings).
"""
import statistics
import sys


def parse(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = {}
            for kv in line.split():
                k, _, v = kv.partition("=")
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def errors(r):
    return int(sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_timeout", "err_status")))


def ms(us):
    return f"{us / 1000:.2f}"


def load(path):
    rows = parse(path)
    order = []
    for r in rows:
        if r["proxy"] not in order:
            order.append(r["proxy"])
    med = {}
    for p in order:
        rs = [r for r in rows if r["proxy"] == p]
        rps = [r["requests"] / (r["duration_us"] / 1e6) for r in rs]
        med[p] = {
            "rounds": len(rs),
            "rps": statistics.median(rps),
            "p50": statistics.median(r["p50_us"] for r in rs),
            "p99": statistics.median(r["p99_us"] for r in rs),
            "p999": statistics.median(r["p999_us"] for r in rs),
            "cpu100k": statistics.median(r["cpu"] / r["requests"] * 1e5 for r in rs) if p != "direct" else None,
            "rss": statistics.median(r["rss_kb"] for r in rs) / 1024 if p != "direct" else None,
            "errors": sum(errors(r) for r in rs),
            "rps_all": rps,
        }
    print("| proxy | requests/s | p50 ms | p99 ms | p99.9 ms | CPU s / 100k req | peak RSS MiB | errors | rounds (req/s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for p in order:
        m = med[p]
        cpu = f"{m['cpu100k']:.2f}" if m["cpu100k"] is not None else "-"
        rss = f"{m['rss']:.1f}" if m["rss"] is not None else "-"
        name = "direct (ceiling)" if p == "direct" else p
        rounds = " ".join(f"{x:.0f}" for x in m["rps_all"])
        print(f"| {name} | {m['rps']:.0f} | {ms(m['p50'])} | {ms(m['p99'])} | {ms(m['p999'])} | {cpu} | {rss} | {m['errors']} | {rounds} |")
    if "kanaria" not in med:
        return
    k = med["kanaria"]
    print()
    print("| ratio | requests/s | p50 | p99 | p99.9 | CPU / req | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for other in ("nginx", "haproxy"):
        if other not in med:
            continue
        o = med[other]
        print(f"| Kanaria / {other} | {k['rps'] / o['rps']:.2f} | {k['p50'] / o['p50']:.2f} | {k['p99'] / o['p99']:.2f} | "
              f"{k['p999'] / o['p999']:.2f} | {k['cpu100k'] / o['cpu100k']:.2f} | {k['rss'] / o['rss']:.2f} |")
    if "nginx" in med:
        n = med["nginx"]
        print()
        print("Targets (one worker each):")
        checks = [
            ("Kanaria/nginx requests/s >= 1.0", k["rps"] / n["rps"] >= 1.0, f"{k['rps'] / n['rps']:.2f}"),
            ("Kanaria/nginx p99 <= 1.0", k["p99"] / n["p99"] <= 1.0, f"{k['p99'] / n['p99']:.2f}"),
            ("Kanaria peak RSS <= 2x nginx", k["rss"] <= 2 * n["rss"], f"{k['rss'] / n['rss']:.2f}x"),
            ("no errors through Kanaria", k["errors"] == 0, str(k["errors"])),
        ]
        for name, ok, val in checks:
            print(f"- {'PASS' if ok else 'FAIL'}: {name} ({val})")


def canary_out(log_path, t_bad, bin_s=0.1):
    """Seconds from t_bad until the canary's traffic stopped for good, or None if it never did.

    The canary's access log has one `$msec $status` line per request. Requests are counted
    in 100 ms bins; the canary is "out" after the last bin following t_bad that still held
    more than max(1, 1% of the canary's pre-fault rate) requests: isolated health probes or
    nginx's one trial request per fail_timeout do not count as traffic.
    """
    times = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if parts:
                try:
                    times.append(float(parts[0]))
                except ValueError:
                    pass
    if not times:
        return 0.0, 0, 0
    before = [t for t in times if t < t_bad]
    after = [t for t in times if t >= t_bad]
    span = (t_bad - before[0]) if before else 0
    per_bin = (len(before) / span * bin_s) if span > 0 else 0
    threshold = max(1, per_bin * 0.01)
    bins = {}
    for t in after:
        b = int((t - t_bad) / bin_s)
        bins[b] = bins.get(b, 0) + 1
    busy = [b for b, n in bins.items() if n > threshold]
    last = max(bins) if bins else 0
    if not busy:
        return 0.0, len(after), last
    return (max(busy) + 1) * bin_s, len(after), last


def canary(path):
    rows = parse(path)
    print("| scenario | proxy | requests | client-visible errors | error % | canary requests after T | canary out of traffic after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        e = errors(r)
        total = int(r["requests"])
        out = r.get("out_s", "never")
        out = "never (still serving at the end)" if out == "never" else f"{out:.1f} s"
        print(f"| {r['scenario']} | {r['proxy']} | {total} | {e} | {100 * e / max(total, 1):.2f} | {int(r['canary_after'])} | {out} |")


def reload(path):
    rows = parse(path)
    print("| proxy | reloads | requests | failed requests | p50 ms | p99 ms during reloads | p99.9 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['proxy']} | {int(r['reloads'])} | {int(r['requests'])} | {errors(r)} | {ms(r['p50_us'])} | "
              f"{ms(r['p99_us'])} | {ms(r['p999_us'])} | {ms(r['max_us'])} |")


def main():
    mode = sys.argv[1]
    if mode == "load":
        load(sys.argv[2])
    elif mode == "canary":
        canary(sys.argv[2])
    elif mode == "reload":
        reload(sys.argv[2])
    elif mode == "canary-out":
        out, n_after, last = canary_out(sys.argv[2], float(sys.argv[3]))
        end = float(sys.argv[4]) if len(sys.argv) > 4 else None
        # Still busy in the last bin before the load ended: it never got out.
        if end is not None and out > 0 and out >= (end - float(sys.argv[3])) - 0.3:
            print(f"out_s=never canary_after={n_after}")
        else:
            print(f"out_s={out:.2f} canary_after={n_after}")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
