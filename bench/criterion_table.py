#!/usr/bin/env python3
"""Markdown table of the criterion hot-path benchmarks (median ns per call), the decisions
checked against the 200 ns target. Reads target/criterion/*/*/new/{benchmark,estimates}.json, so
run it after `cargo bench --bench hot_path`; writes bench/results/hot-path-STAMP.md too."""
import glob
import json
import os
import sys
import time

TARGET_NS = 200.0
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
rows = []
for bench in sorted(glob.glob(os.path.join(root, "target/criterion/*/*/new/benchmark.json"))):
    new = os.path.dirname(bench)
    with open(bench) as f:
        full_id = json.load(f)["full_id"]
    with open(os.path.join(new, "estimates.json")) as f:
        median = json.load(f)["median"]["point_estimate"]
    rows.append((full_id, median))
if not rows:
    sys.exit("no criterion results: run `cargo bench --bench hot_path` first")
lines = [
    "| benchmark | median ns | target < 200 ns |",
    "| --- | ---: | --- |",
]
for name, ns in rows:
    # The target is for the decisions (split, route, recording, the request filter); the
    # header work on forwarded messages is measured so its trims can be, without a target.
    targeted = not name.startswith("request/") or name.startswith("request/filter")
    verdict = ("PASS" if ns < TARGET_NS else "FAIL") if targeted else "-"
    lines.append(f"| {name} | {ns:.1f} | {verdict} |")
table = "\n".join(lines)
print(table)
stamp = time.strftime("%Y%m%d-%H%M%S")
results = os.environ.get("BENCH_RESULTS_DIR", os.path.join(root, "bench", "results"))
os.makedirs(results, exist_ok=True)
with open(os.path.join(results, f"hot-path-{stamp}.md"), "w") as f:
    f.write(f"# Hot path micro-benchmarks ({stamp})\n\n{table}\n")
