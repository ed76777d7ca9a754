"""One long-lived TCP connection: a line every --every seconds for --seconds,
each checked against its echo. Prints a JSON summary: lines sent, answered,
and the first error if the connection broke. Writes "ready" to stdout (and
flushes) once connected, so a test can wait for it."""

from __future__ import annotations

import argparse
import json
import socket
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--every", type=float, default=0.2)
    a = p.parse_args()
    sent = answered = 0
    error = ""
    try:
        s = socket.create_connection((a.host, a.port), timeout=10)
        f = s.makefile("rwb")
        print("ready", flush=True)
        end = time.monotonic() + a.seconds
        while time.monotonic() < end:
            msg = f"ping {sent}\n".encode()
            f.write(msg)
            f.flush()
            sent += 1
            line = f.readline()
            if not line.endswith(msg):
                error = f"bad or no echo for line {sent}: {line[:60]!r}"
                break
            answered += 1
            time.sleep(a.every)
        s.close()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"sent": sent, "answered": answered, "error": error}), flush=True)


if __name__ == "__main__":
    main()
