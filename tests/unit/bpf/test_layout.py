"""The ctypes mirrors in meshnode.bpf.layout match meshnode.h, checked with gcc."""

from __future__ import annotations

import ctypes as ct
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.bpf import layout

HEADER_DIR = Path(layout.__file__).resolve().parent
PIN_MACROS = {
    "MN_PIN_ORIG_DST": layout.PIN_ORIG_DST,
    "MN_PIN_WORKLOADS": layout.PIN_WORKLOADS,
    "MN_PIN_DESTINATIONS": layout.PIN_DESTINATIONS,
    "MN_PIN_STRICT": layout.PIN_STRICT,
}
# Host-order IPv4 macros and the dotted address layout.py has for each.
IP4_MACROS = {"MN_PROXY_INBOUND_SRC_IP4": layout.PROXY_INBOUND_SOURCE}


def _probe_source() -> str:
    """A C program printing, from the header, what the ctypes side claims."""
    lines = [
        "#define MESHNODE_USERSPACE 1",
        '#include "meshnode.h"',
        "#include <stddef.h>",
        "#include <stdio.h>",
        "int main(void) {",
    ]
    for struct in layout.STRUCTS:
        c = f"struct {struct.C_NAME}"
        lines.append(f'printf("size {struct.C_NAME} %zu\\n", sizeof({c}));')
        for name, *_ in struct._fields_:
            lines.append(
                f'printf("field {struct.C_NAME}.{name} %zu %zu\\n", '
                f"offsetof({c}, {name}), sizeof((({c} *)0)->{name}));"
            )
    for macro in PIN_MACROS:
        lines.append(f'printf("pin {macro} %s\\n", {macro});')
    for macro in IP4_MACROS:
        lines.append(
            f'printf("ip4 {macro} %u.%u.%u.%u\\n", ({macro} >> 24) & 255, '
            f"({macro} >> 16) & 255, ({macro} >> 8) & 255, {macro} & 255);"
        )
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


def _python_view() -> list[str]:
    out = []
    for struct in layout.STRUCTS:
        out.append(f"size {struct.C_NAME} {ct.sizeof(struct)}")
        for name, *_ in struct._fields_:
            field = getattr(struct, name)
            out.append(f"field {struct.C_NAME}.{name} {field.offset} {field.size}")
    for macro, value in PIN_MACROS.items():
        out.append(f"pin {macro} {value}")
    for macro, value in IP4_MACROS.items():
        out.append(f"ip4 {macro} {value}")
    return out


def test_ctypes_mirror_matches_header(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc not found on PATH: cannot compile meshnode.h to compare layouts")
        pytest.skip("gcc not found on PATH: cannot compile meshnode.h to compare layouts")
    src = tmp_path / "probe.c"
    src.write_text(_probe_source())
    exe = tmp_path / "probe"
    build = subprocess.run(
        [gcc, "-Wall", "-Werror", f"-I{HEADER_DIR}", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"probe did not compile:\n{build.stderr}"
    c_view = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert c_view.splitlines() == _python_view()


def test_constructors_store_network_order() -> None:
    key = layout.DestKey.of("240.0.0.1", 80)
    assert bytes(key) == bytes([240, 0, 0, 1, 0, 80, 0, 0])
    assert key.address() == ("240.0.0.1", 80)

    rec = layout.OrigDstRecord.of("10.1.2.3", 443, 7, created_ns=0x0102030405060708)
    assert bytes(rec) == bytes(
        [10, 1, 2, 3, 1, 187, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
    )
    assert rec.address() == ("10.1.2.3", 443)

    tup = layout.TupleKey.of("::ffff:127.0.0.1", 40000, "127.0.0.1", 15001)
    assert bytes(tup) == bytes([127, 0, 0, 1, 127, 0, 0, 1, 0x9C, 0x40, 0x3A, 0x99])
    assert layout.WorkloadInfo.of(5).workload_id == 5

    strict = layout.StrictKey.of(0x0102030405060708, 8080)
    assert ct.sizeof(strict) == 16
    assert bytes(strict)[8:] == bytes([0x1F, 0x90, 0, 0, 0, 0, 0, 0])  # port, then zero pad
    assert int.from_bytes(bytes(strict)[:8], sys.byteorder) == 0x0102030405060708  # host order
    assert strict.entry() == (0x0102030405060708, 8080)


def test_constructors_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        layout.DestKey.of("2001:db8::1", 80)
    with pytest.raises(ValueError):
        layout.DestKey.of("10.0.0.1", 70000)
    with pytest.raises(ValueError):
        layout.StrictKey.of(1, 70000)
    with pytest.raises(ValueError):
        layout.StrictKey.of(-1, 80)
