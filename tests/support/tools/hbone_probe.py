"""Connects to an HBONE listener with a given client certificate (or none) and
reports whether the listener spoke HTTP/2 to it: prints ACCEPTED if a SETTINGS
frame came back, REFUSED: <why> otherwise. Run inside a lab node."""

from __future__ import annotations

import socket
import ssl
import sys


def main() -> None:
    host, port, sni, bundle = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    cert = sys.argv[5] if len(sys.argv) > 5 else None
    key = sys.argv[6] if len(sys.argv) > 6 else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=bundle)
    ctx.set_alpn_protocols(["h2"])
    if cert:
        ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            tls.sendall(preface + empty_settings)
            data = tls.recv(9)
            if len(data) >= 4 and data[3] == 0x04:
                print("ACCEPTED")
            else:
                print(f"REFUSED: no HTTP/2 SETTINGS from the server (got {data!r})")
    except (ssl.SSLError, OSError) as exc:
        print(f"REFUSED: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
