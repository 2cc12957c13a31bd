#!/usr/bin/env python3
"""Held connections for bench/held.sh: opens COUNT connections to 127.0.0.1:PORT, makes one
HTTP/1.1 GET on each (a distinct x-user-id, keep-alive; with --h2c an HTTP/2 GET with prior
knowledge, one stream, written out by hand below), reads the whole answer, and then
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


async def one(port, i, sem, held, statuses, timeout, h2c):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            statuses["connect:" + type(e).__name__] += 1
            return
        try:
            if h2c:
                statuses[await one_h2c(r, w, i, timeout)] += 1
                held.append((r, w))
                return
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


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def hpack_literal(name, value):
    # A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2); the
    # names and values here are all shorter than 127 bytes.
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


async def one_h2c(r, w, i, timeout):
    """One GET on stream 1 of a new HTTP/2 connection; the answer's status, read to its end."""
    block = (
        b"\x82\x86\x84"  # :method GET, :scheme http, :path / (static table)
        + b"\x01" + bytes([len(b"127.0.0.1")]) + b"127.0.0.1"  # :authority, indexed name
        + hpack_literal(b"x-user-id", b"u%d" % i)
    )
    w.write(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + h2_frame(0x4, 0, 0)  # SETTINGS, none changed
        + h2_frame(0x1, 0x5, 1, block)  # HEADERS, END_STREAM | END_HEADERS
    )
    status = None
    while True:
        head = await asyncio.wait_for(r.readexactly(9), timeout)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = await asyncio.wait_for(r.readexactly(length), timeout) if length else b""
        if kind == 0x4 and not flags & 0x1:
            w.write(h2_frame(0x4, 0x1, 0))  # SETTINGS ACK
        elif kind == 0x6 and not flags & 0x1:
            w.write(h2_frame(0x6, 0x1, 0, payload))  # PING ACK
        elif kind == 0x7:
            raise ValueError("GOAWAY")
        elif stream == 1 and kind == 0x1 and status is None:
            # :status 200 is the static table's entry 8 (0x88); anything else is counted as is.
            status = "200" if payload[:1] == b"\x88" else "h2-status-" + payload[:1].hex()
        elif stream == 1 and kind == 0x3:
            raise ValueError("RST_STREAM")
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return status or "h2-no-head"


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--parallel", type=int, default=100)
    ap.add_argument("--hold", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--h2c", action="store_true", help="HTTP/2 with prior knowledge")
    a = ap.parse_args()
    if not 0 < a.count <= 200_000:
        sys.exit("count out of bounds (1..200000)")
    held, statuses = [], collections.Counter()
    sem = asyncio.Semaphore(a.parallel)
    t0 = time.monotonic()
    await asyncio.gather(*(one(a.port, i, sem, held, statuses, a.timeout, a.h2c) for i in range(a.count)))
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
