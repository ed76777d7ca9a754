"""`meshnode bench`: meshnode against no mesh, sidecar pairs and a central load
balancer, in a fresh 3-node lab (needs root). See docs/benchmarks.md."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshnode.cli.common import fail
from meshnode.cli.output import Progress, progress_option, progress_printer


def _parse_paths(value: str | None) -> list[str]:
    from meshnode.bench.report import BASELINE, PATHS

    if not value:
        return list(PATHS)
    wanted = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PATHS]
    if unknown:
        raise click.BadParameter(
            f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}",
            param_hint="--paths",
        )
    if BASELINE not in wanted:
        wanted.insert(0, BASELINE)  # every ratio and the added latency need it
    return [p for p in PATHS if p in wanted]


@click.command("bench")
@click.option("--quick", is_flag=True, help="Smoke run: 2 s per measurement, 1 repetition.")
@click.option(
    "--duration",
    type=click.FloatRange(1, 600),
    default=10.0,
    show_default=True,
    help="Seconds per measurement.",
)
@click.option(
    "--repeat",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="Repetitions (the report shows medians).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Where results.json and the PNGs go.",
)
@click.option(
    "--paths",
    "paths_opt",
    default=None,
    help="Comma-separated subset of: direct, meshnode, haproxy-mtls, stunnel-mtls, "
    "central-lb, meshnode-same-node (direct is always added). "
    "Default: all, plus the memory sub-benchmark.",
)
@click.option(
    "--memory",
    is_flag=True,
    help="Run the memory sub-benchmark (alone, or with the --paths given).",
)
@click.option(
    "--ztunnel-workers",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="ztunnel worker processes per lab node. The lab's nodes (and the clients "
    "and servers) all share this machine's cores.",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sample the meshnode paths' proxies with py-spy during the keep-alive "
    "measurement and write collapsed stacks here (needs py-spy; it slows "
    "the proxies: do not compare a profiled run's numbers).",
)
@click.option(
    "--soak",
    "soak_for",
    default=None,
    metavar="DURATION",
    help="Instead of the comparison: churn through the mesh for DURATION (e.g. "
    "20s, 10m; new connection per request plus keep-alive) and report the "
    "ztunnels' RSS and fd slopes, failed requests and the slowest request.",
)
@click.option(
    "--controlplane",
    "controlplane",
    is_flag=True,
    help="Instead: simulate --nodes nodes (real TLS, enrollment, workloads, watchers) "
    "against one control plane and report its scale (docs/benchmarks.md).",
)
@click.option(
    "--dns",
    "dns_bench",
    is_flag=True,
    help="Instead: the mesh DNS proxy against dnsmasq with dnsperf, on loopback "
    "(answers/s and latency; docs/benchmarks.md).",
)
@click.option("--nodes", type=click.IntRange(1, 100000), default=100, show_default=True)
@click.option("--workloads", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option(
    "--procs",
    type=click.IntRange(0, 64),
    default=0,
    help="Load-generator processes [default: one per core].",
)
@click.option("--db", default=None, help="postgresql://... (default: SQLite).")
@click.option(
    "--namespaces",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="With --controlplane: spread the nodes' workloads over this many namespaces.",
)
@click.option(
    "--node-view",
    type=click.Choice(["mesh", "namespace"]),
    default="mesh",
    show_default=True,
    help="With --controlplane: the control plane's --node-view.",
)
@progress_option
def bench(
    quick: bool,
    duration: float,
    repeat: int,
    out_dir: Path,
    paths_opt: str | None,
    memory: bool,
    ztunnel_workers: int,
    profile_dir: Path | None,
    soak_for: str | None,
    controlplane: bool,
    dns_bench: bool,
    nodes: int,
    workloads: int,
    procs: int,
    db: str | None,
    namespaces: int,
    node_view: str,
    progress: bool | None,
) -> None:
    """Benchmark meshnode against direct, HAProxy/stunnel mTLS pairs and a central LB.

    Builds a fresh 3-node lab named `mnbench`, prints a table, writes results.json
    and one PNG per metric to --out, and removes the lab even on failure or Ctrl-C.
    """
    from meshnode.bench import plots, report
    from meshnode.bench.runner import BenchError, Options, missing_tools
    from meshnode.bpf.errors import BpfError
    from meshnode.lab.host import HostError
    from meshnode.lab.lab import LabError

    if controlplane:
        opts = cpsim_options(nodes, workloads, procs, db, namespaces, node_view)
        _controlplane(opts, out_dir)
        return
    if dns_bench:
        _dns(2.0 if quick else duration, out_dir)
        return
    if os.geteuid() != 0:
        fail("meshnode bench builds a lab of network namespaces and cgroups: run it as root")
    if soak_for is not None:
        _soak(soak_for, out_dir, ztunnel_workers)
        return
    if quick:
        duration, repeat = 2.0, 1
    if paths_opt is None and memory:
        paths: list[str] = []
    else:
        paths = _parse_paths(paths_opt)
    run_memory = memory or paths_opt is None
    missing = missing_tools(paths, run_memory, profile=profile_dir is not None)
    if missing:
        fail(
            f"missing tools: {', '.join(missing)} (scripts/setup.sh --test installs them; "
            "py-spy, for --profile only: pip install py-spy)"
        )
    opts = Options(
        paths=paths,
        duration=duration,
        repeat=repeat,
        memory=run_memory,
        churn_seconds=1.0 if quick else 3.0,
        ztunnel_workers=ztunnel_workers,
        profile_dir=profile_dir,
    )
    click.echo(
        f"meshnode bench: paths {', '.join(paths) or '(none)'}; {duration:.0f}s per "
        f"measurement x {repeat}; memory sub-benchmark: {'yes' if run_memory else 'no'}"
    )
    try:
        # Ctrl-C / SIGTERM: KeyboardInterrupt
        doc = _progress_bench(opts, progress_printer(progress)).run()
    except KeyboardInterrupt:
        fail("interrupted; the lab was taken down", code=130)
    except (BenchError, LabError, HostError, BpfError) as exc:
        fail(f"bench failed: {exc}\n(the lab was taken down)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    tgts = [report.Target(**t) for t in doc["targets"]]
    subtitle = (
        f"median of {repeat} x {duration:.0f}s, one run on a shared "
        f"{doc['meta']['cores']}-core machine"
    )
    pngs = plots.write_plots(doc["summary"], out_dir, doc["memory"], subtitle)
    click.echo("")
    click.echo(report.render_report(doc["summary"], tgts, doc["memory"]))
    click.echo("")
    click.echo(f"wrote {out_dir / 'results.json'} and {len(pngs)} PNGs in {out_dir}")


def _progress_bench(opts: Any, out: Callable[[str], None] | None) -> Any:
    """A Bench that also counts its steps (lab up, paths checked, each path and
    repetition, the memory sub-benchmark, lab down) on `out`."""
    from meshnode.bench.runner import Bench, PathSpec

    total = 2 + opts.repeat * len(opts.paths) + (1 if opts.memory else 0) + 1
    steps = Progress(total, out)

    class ProgressBench(Bench):
        def setup(self) -> None:
            super().setup()
            steps.step(f"lab {self.lab_name} up, servers started")

        def check_paths(self, specs: list[PathSpec]) -> None:
            super().check_paths(specs)
            steps.step(f"{len(specs)} path(s) answer")

        def measure_path(self, s: PathSpec) -> dict[str, float | None]:
            row: dict[str, float | None] = super().measure_path(s)
            steps.step(f"{s.name}: measured")
            return row

        def memory(self) -> dict[str, Any]:
            doc: dict[str, Any] = super().memory()
            steps.step("memory sub-benchmark done")
            return doc

        def teardown(self, keep_logs: bool = False) -> None:
            super().teardown(keep_logs)
            steps.step(f"lab {self.lab_name} down")

    return ProgressBench(opts, log=click.echo)


def _dns(duration: float, out_dir: Path) -> None:
    from meshnode.bench.dnsbench import DnsBenchError, DnsBenchOptions, render, run_dns_bench

    try:
        result = run_dns_bench(DnsBenchOptions(duration=duration), log=click.echo)
    except DnsBenchError as exc:
        fail(f"DNS bench failed: {exc}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dns.json").write_text(json.dumps(result, indent=1))
    click.echo("")
    click.echo(render(result))
    click.echo(f"\nwrote {out_dir / 'dns.json'}")


def _soak(soak_for: str, out_dir: Path, ztunnel_workers: int) -> None:
    from meshnode.bench import soak
    from meshnode.bench.runner import Bench, Options, missing_tools
    from meshnode.core.errors import MeshnodeError

    try:
        seconds = soak.parse_duration(soak_for)
    except soak.SoakError as exc:
        raise click.BadParameter(str(exc), param_hint="--soak") from None
    missing = missing_tools(["meshnode"], False)
    if missing:
        fail(f"missing tools: {', '.join(missing)} (scripts/setup.sh --test installs them)")
    opts = Options(
        paths=["meshnode"],
        duration=seconds,
        repeat=1,
        memory=False,
        ztunnel_workers=ztunnel_workers,
    )
    try:
        result = soak.run_soak(Bench(opts, log=click.echo), seconds)
    except KeyboardInterrupt:
        fail("interrupted; the lab was taken down", code=130)
    except (soak.SoakError, MeshnodeError) as exc:
        fail(f"soak failed: {exc}\n(the lab was taken down)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result.as_dict(), indent=1))
    click.echo(result.render())
    click.echo(f"wrote {out_dir / 'soak.json'}")


def cpsim_options(
    nodes: int, workloads: int, procs: int, db: str | None, namespaces: int, node_view: str
) -> Any:
    import meshnode.bench.cpsim as cpsim

    return cpsim.SimOptions(
        nodes=nodes,
        workloads=workloads,
        procs=procs,
        db=db,
        namespaces=namespaces,
        node_view=node_view,
        # A phase (registering every workload) must not time out on a large run:
        # 600 s, or 20 ms per workload, whichever is longer.
        phase_timeout=max(600.0, 0.02 * nodes * workloads),
    )


def _controlplane(opts: Any, out_dir: Path) -> None:
    import meshnode.bench.cpsim as cpsim
    from meshnode.core.errors import MeshnodeError

    try:
        result = cpsim.run_simulation(opts, log=click.echo)
    except KeyboardInterrupt:
        fail("interrupted; the control plane was stopped", code=130)
    except MeshnodeError as exc:
        fail(f"control-plane simulation failed: {exc}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "controlplane.json").write_text(json.dumps(result, indent=1))
    click.echo("\n" + cpsim.render(result))
    click.echo(f"\nwrote {out_dir / 'controlplane.json'}")
