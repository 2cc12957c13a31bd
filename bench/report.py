#!/usr/bin/env python3
"""Turns the raw lines of the benchmark scripts into markdown tables.

    report.py load RAW          medians per proxy; ratios Kanaria/bare Pingora, bare Pingora/nginx,
                                Kanaria/nginx, /HAProxy per worker count; A/B runs; scaling; targets
    report.py instructions RAW  fixed request count: callgrind instructions, system calls, task-clock
    report.py memory RAW        RSS with 1 and 1,000 routes, per extra route
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


def split_workers(name):
    """`kanaria@2` -> ("kanaria", "@2"); `nginx` -> ("nginx", "")."""
    base, at, n = name.rpartition("@")
    return (base, "@" + n) if at and n.isdigit() else (name, "")


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
            "conns": sum(int(r["upstream_conns"]) for r in rs) if "upstream_conns" in rs[0] else None,
            "rps_all": rps,
        }
    print("| proxy | requests/s | p50 ms | p99 ms | p99.9 ms | CPU s / 100k req | peak RSS MiB | errors | new upstream conns (all rounds) | rounds (req/s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for p in order:
        m = med[p]
        cpu = f"{m['cpu100k']:.2f}" if m["cpu100k"] is not None else "-"
        rss = f"{m['rss']:.1f}" if m["rss"] is not None else "-"
        conns = str(m["conns"]) if m["conns"] is not None else "-"
        name = "direct (ceiling)" if p == "direct" else "bare Pingora (floor)" if p == "bare" else p
        rounds = " ".join(f"{x:.0f}" for x in m["rps_all"])
        print(f"| {name} | {m['rps']:.0f} | {ms(m['p50'])} | {ms(m['p99'])} | {ms(m['p999'])} | {cpu} | {rss} | {m['errors']} | {conns} | {rounds} |")

    # Ratios within each worker count: what is Kanaria's (Kanaria / bare Pingora), what is
    # Pingora's (bare Pingora / nginx), and the sum of both (Kanaria / nginx).
    pairs = [("kanaria", "bare", "Kanaria / bare Pingora"), ("bare", "nginx", "bare Pingora / nginx"),
             ("kanaria", "nginx", "Kanaria / nginx"), ("kanaria", "haproxy", "Kanaria / haproxy"),
             ("bare", "haproxy", "bare Pingora / haproxy")]
    lines = []
    for suffix in sorted({split_workers(p)[1] for p in order}):
        for a, b, label in pairs:
            if a + suffix in med and b + suffix in med:
                x, y = med[a + suffix], med[b + suffix]
                label += f" ({suffix[1:]} workers)" if suffix else ""
                lines.append(f"| {label} | {x['rps'] / y['rps']:.2f} | {x['p50'] / y['p50']:.2f} | {x['p99'] / y['p99']:.2f} | "
                             f"{x['p999'] / y['p999']:.2f} | {x['cpu100k'] / y['cpu100k']:.2f} | {x['rss'] / y['rss']:.2f} |")
    if "kanaria" in med and "kanaria-nolog" in med:
        x, y = med["kanaria"], med["kanaria-nolog"]
        lines.append(f"| kanaria / kanaria-nolog (access log on / off) | {x['rps'] / y['rps']:.2f} | {x['p50'] / y['p50']:.2f} | "
                     f"{x['p99'] / y['p99']:.2f} | {x['p999'] / y['p999']:.2f} | {x['cpu100k'] / y['cpu100k']:.2f} | {x['rss'] / y['rss']:.2f} |")
    # A/B runs: another build or other Pingora settings against the default one.
    for p in order:
        base = p.split(":", 1)[0] + split_workers(p)[1] if ":" in p else None
        if base and base in med:
            x, y = med[p], med[base]
            lines.append(f"| {p} / {base} | {x['rps'] / y['rps']:.2f} | {x['p50'] / y['p50']:.2f} | {x['p99'] / y['p99']:.2f} | "
                         f"{x['p999'] / y['p999']:.2f} | {x['cpu100k'] / y['cpu100k']:.2f} | {x['rss'] / y['rss']:.2f} |")
    if lines:
        print()
        print("| ratio | requests/s | p50 | p99 | p99.9 | CPU / req | peak RSS |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(lines))

    # Scaling: N workers against one, per proxy.
    scaling = []
    for p in order:
        base, suffix = split_workers(p)
        if suffix and base in med:
            scaling.append(f"| {base} | {suffix[1:]} | {med[base]['rps']:.0f} | {med[p]['rps']:.0f} | {med[p]['rps'] / med[base]['rps']:.2f} |")
    if scaling:
        print()
        print("| proxy | workers | requests/s, 1 worker | requests/s, N workers | N / 1 |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print("\n".join(scaling))

    if "kanaria" in med and "nginx" in med:
        k, n = med["kanaria"], med["nginx"]
        print()
        print("Targets (one worker each):")
        checks = [
            ("Kanaria/nginx requests/s >= 1.0", k["rps"] / n["rps"] >= 1.0, f"{k['rps'] / n['rps']:.2f}"),
            ("Kanaria/nginx p99 <= 1.0", k["p99"] / n["p99"] <= 1.0, f"{k['p99'] / n['p99']:.2f}"),
            ("Kanaria peak RSS <= 2x nginx", k["rss"] <= 2 * n["rss"], f"{k['rss'] / n['rss']:.2f}x"),
            ("no errors through Kanaria", k["errors"] == 0, str(k["errors"])),
        ]
        if "bare" in med:
            b = med["bare"]
            checks.append(("Kanaria CPU per request <= 1.05x bare Pingora", k["cpu100k"] <= 1.05 * b["cpu100k"],
                           f"{k['cpu100k'] / b['cpu100k']:.2f}x"))
        if "kanaria-nolog" in med:
            q = med["kanaria-nolog"]
            checks.append(("access log costs <= 5% of requests/s", k["rps"] >= 0.95 * q["rps"],
                           f"{k['rps'] / q['rps']:.2f} of the requests/s without it"))
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


def instructions(path):
    rows = parse(path)
    med = {}
    for p in dict.fromkeys(r["proxy"] for r in rows):
        rs = [r for r in rows if r["proxy"] == p]
        irs = [r["ir"] / r["ir_requests"] for r in rs]
        med[p] = {
            "sys": statistics.median(r["syscalls"] / r["requests"] for r in rs),
            "clock": statistics.median(r["task_clock_ms"] * 1000 / r["requests"] for r in rs),
            "ir": statistics.median(irs),
            "spread": (max(irs) - min(irs)) / statistics.median(irs),
            "rounds": len(rs),
        }
    print("| proxy | instructions / request (callgrind) | spread over rounds | system calls / request | task-clock µs / request |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for p, m in med.items():
        name = "bare Pingora (floor)" if p == "bare" else p
        print(f"| {name} | {m['ir']:.0f} | {100 * m['spread']:.1f}% | {m['sys']:.2f} | {m['clock']:.1f} |")
    pairs = [("kanaria", "bare", "Kanaria / bare Pingora"), ("bare", "nginx", "bare Pingora / nginx"),
             ("kanaria", "nginx", "Kanaria / nginx")]
    pairs += [(p, p.split(":", 1)[0], f"{p} / {p.split(':', 1)[0]}") for p in med if ":" in p]
    lines = [f"| {label} | {med[a]['ir'] / med[b]['ir']:.3f} | {med[a]['sys'] / med[b]['sys']:.2f} | {med[a]['clock'] / med[b]['clock']:.2f} |"
             for a, b, label in pairs if a in med and b in med]
    if lines:
        print()
        print("| ratio | instructions | system calls | task-clock |")
        print("| --- | ---: | ---: | ---: |")
        print("\n".join(lines))


def memory(path):
    rows = parse(path)
    # Runs from before the all-routes load have no both_tracks / all_requests columns.
    full = all("both_tracks" in r for r in rows)
    extra_head = " routes with both versions | requests to all routes | /metrics KB |" if full else ""
    print(f"| routes | RSS ready MiB | RSS after load MiB | peak RSS MiB | requests/s |{extra_head}")
    print("| ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if full else ""))
    for r in rows:
        extra_cols = (f" {int(r['both_tracks'])} | {int(r['all_requests'])} | {r.get('scrape_bytes', 0) / 1000:.0f} |"
                      if full else "")
        print(f"| {int(r['routes'])} | {r['ready_kb'] / 1024:.1f} | {r['loaded_kb'] / 1024:.1f} | {r['peak_kb'] / 1024:.1f} | "
              f"{r['requests'] / (r['duration_us'] / 1e6):.0f} |{extra_cols}")
    if len(rows) >= 2 and rows[-1]["routes"] > rows[0]["routes"]:
        a, b = rows[0], rows[-1]
        extra = b["routes"] - a["routes"]
        print()
        print(f"Per extra route: {(b['ready_kb'] - a['ready_kb']) / extra:.1f} KiB once ready, "
              f"{(b['loaded_kb'] - a['loaded_kb']) / extra:.1f} KiB after load, "
              f"{(b['peak_kb'] - a['peak_kb']) / extra:.1f} KiB at peak.")


def main():
    mode = sys.argv[1]
    if mode == "load":
        load(sys.argv[2])
    elif mode == "memory":
        memory(sys.argv[2])
    elif mode == "instructions":
        instructions(sys.argv[2])
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
