"""A bounded load of new TCP connections: each connects, sends one HTTP/1.0
request, reads the whole answer and closes. Prints one JSON line per
connection ({"i", "t", "ok", "server", "error"}) and a summary line last.
Stops at --count connections or --max-seconds, whichever comes first."""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time

NAME = re.compile(rb"this is ([\w.-]+)")


def one(host: str, port: int, timeout: float) -> tuple[bool, str, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        body = b"".join(chunks)
        m = NAME.search(body)
        if not m:
            return False, "", f"no server name in {body[:80]!r}"
        return True, m.group(1).decode(), ""
    except OSError as exc:
        return False, "", f"{type(exc).__name__}: {exc}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.0, help="pause per worker between conns")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    a = p.parse_args()
    start = time.monotonic()
    lock = threading.Lock()
    counter = iter(range(a.count))
    results: dict[str, int] = {}
    failures = 0

    def worker() -> None:
        nonlocal failures
        while time.monotonic() - start < a.max_seconds:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            ok, server, error = one(a.host, a.port, a.timeout)
            t = round(time.monotonic() - start, 3)
            with lock:
                if ok:
                    results[server] = results.get(server, 0) + 1
                else:
                    failures += 1
                sys.stdout.write(
                    json.dumps({"i": i, "t": t, "ok": ok, "server": server, "error": error}) + "\n"
                )
                sys.stdout.flush()
            if a.interval:
                time.sleep(a.interval)

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(
        json.dumps(
            {
                "summary": True,
                "servers": results,
                "failures": failures,
                "seconds": round(time.monotonic() - start, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
