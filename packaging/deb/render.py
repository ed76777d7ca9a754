"""Renders the package's generated files from the code being packaged: the systemd
units (nodeagent/units.py, the same text `meshnode enroll` would write), a man page
made from every command's --help, and click's bash completion script.

    python3 render.py STAGE VERSION

runs with the staged tree first on sys.path (scripts/build-deb.sh sets PYTHONPATH),
so what is rendered is what the package runs.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import click

from meshnode.cli.main import cli
from meshnode.nodeagent.units import render_package_units

EXE = Path("/usr/bin/meshnode")


def _roff(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e")
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _walk(cmd: click.Command, path: list[str], ctx: click.Context | None):  # type: ignore[no-untyped-def]
    here = click.Context(cmd, info_name=" ".join(path), parent=ctx)
    yield path, cmd, here
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(here):
            sub = cmd.get_command(here, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, [*path, name], here)


def man_page(version: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out = [
        f'.TH MESHNODE 8 "{date}" "meshnode {version}" "System Administration"',
        ".SH NAME",
        "meshnode \\- sidecar-less, eBPF-assisted node-level service mesh",
        ".SH SYNOPSIS",
        ".B meshnode",
        "COMMAND [OPTIONS]",
        ".SH DESCRIPTION",
        "One node agent and one shared node proxy (ztunnel) per node; a control plane "
        "grants identities, enrolls nodes and pushes services and policies. Each command "
        "below is shown with its own --help.",
        ".SH COMMANDS",
    ]
    for path, cmd, ctx in _walk(cli, ["meshnode"], None):
        out += [f".SS {' '.join(path)}", ".nf", _roff(cmd.get_help(ctx)), ".fi"]
    out += [
        ".SH FILES",
        ".TP\n/etc/meshnode\nThe node's enrollment, key (0600) and certificates.",
        ".TP\n/var/lib/meshnode\nThe node's state: the last control-plane slice, snapshots.",
        ".TP\n/var/lib/meshnode-cp\nThe control plane's data (meshnode-controlplane.service).",
        ".SH SEE ALSO",
        "systemctl(1), journalctl(1), bpftool(8)",
    ]
    return "\n".join(out) + "\n"


def completion() -> str:
    env = {**os.environ, "_MESHNODE_COMPLETE": "bash_source"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli.main"], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0 or "complete" not in proc.stdout:
        raise SystemExit(f"no bash completion script from click: {proc.stderr.strip()}")
    return proc.stdout


def main() -> None:
    stage, version = Path(sys.argv[1]), sys.argv[2]
    units = stage / "lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for name, text in render_package_units(EXE).items():
        (units / name).write_text(text)
    man = stage / "usr/share/man/man8"
    man.mkdir(parents=True, exist_ok=True)
    (man / "meshnode.8").write_text(man_page(version))
    comp = stage / "usr/share/bash-completion/completions"
    comp.mkdir(parents=True, exist_ok=True)
    (comp / "meshnode").write_text(completion())


if __name__ == "__main__":
    main()
