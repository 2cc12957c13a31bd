#!/usr/bin/env python3
"""Held connections for bench/held.sh: opens COUNT connections to 127.0.0.1:PORT, makes one
HTTP/1.1 GET on each (a distinct x-user-id, keep-alive), reads the whole answer, and then
holds every connection open and idle. At most PARALLEL connections are being opened at
once. Once all are held it writes "held=N failed=F statuses=..." to READY_FILE and waits
(at most HOLD seconds, or until SIGTERM/SIGINT); before closing them it prints how many
the server had closed meanwhile ("closed_by_peer=K"). Standard library only; bounded in
count and time; connects only to 127.0.0.1."""

import argparse
import asyncio
import collections
import signal
import sys
import time


async def one(port, i, sem, held, statuses, timeout):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            statuses["connect:" + type(e).__name__] += 1
            return
        try:
            w.write(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: kanaria-bench-hold\r\n"
                b"Accept: */*\r\nx-user-id: u%d\r\n\r\n" % i
            )
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
            status = head.split(b" ", 2)[1].decode()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            if length:
                await asyncio.wait_for(r.readexactly(length), timeout)
            statuses[status] += 1
            held.append((r, w))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            statuses["request:" + type(e).__name__] += 1
            w.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--parallel", type=int, default=100)
    ap.add_argument("--hold", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    if not 0 < a.count <= 200_000:
        sys.exit("count out of bounds (1..200000)")
    held, statuses = [], collections.Counter()
    sem = asyncio.Semaphore(a.parallel)
    t0 = time.monotonic()
    await asyncio.gather(*(one(a.port, i, sem, held, statuses, a.timeout) for i in range(a.count)))
    opened = time.monotonic() - t0
    failed = a.count - len(held)
    st = ",".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
    with open(a.ready_file + ".tmp", "w") as f:
        f.write(f"held={len(held)} failed={failed} statuses={st} open_s={opened:.1f}\n")
    import os

    os.replace(a.ready_file + ".tmp", a.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), a.hold)
    except asyncio.TimeoutError:
        pass
    closed = sum(1 for r, _ in held if r.at_eof())
    print(f"held={len(held)} failed={failed} closed_by_peer={closed}", flush=True)
    for _, w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
