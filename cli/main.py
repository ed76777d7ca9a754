"""The `meshnode` command. Subcommand groups load lazily, so `meshnode --help`
never imports bcc or asyncio machinery."""

from __future__ import annotations

import importlib
import sys

import click

from meshnode import __version__

# The variable click's completion scripts set when they ask meshnode for candidates.
COMPLETE_VAR = "_MESHNODE_COMPLETE"

# name -> (module, attribute): each area exports one click command or group.
_COMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("meshnode.cli.lab", "lab"),
    "agent": ("meshnode.cli.agent", "agent"),
    "ztunnel": ("meshnode.cli.ztunnel", "ztunnel"),
    "bench": ("meshnode.cli.bench", "bench"),
    "config": ("meshnode.cli.config", "config"),
    "workload": ("meshnode.cli.workload", "workload"),
    "status": ("meshnode.cli.status", "status"),
    "dns": ("meshnode.cli.dns", "dns"),
    "enroll": ("meshnode.cli.enroll", "enroll"),
    "controlplane": ("meshnode.cli.controlplane", "controlplane"),
    "token": ("meshnode.cli.admin", "token"),
    "apply": ("meshnode.cli.admin", "apply"),
    "get": ("meshnode.cli.admin", "get"),
    "delete": ("meshnode.cli.admin", "delete"),
    "ca": ("meshnode.cli.admin", "ca"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _COMMANDS:
            module, attr = _COMMANDS[cmd_name]
            cmd: click.Command = getattr(importlib.import_module(module), attr)
            return cmd
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"auto_envvar_prefix": "MESHNODE"})
@click.version_option(__version__, prog_name="meshnode")
def cli() -> None:
    """meshnode: a node-level service mesh for VMs, hosts and containers."""


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash: eval "$(meshnode completion bash)"   (e.g. in ~/.bashrc)
    zsh:  eval "$(meshnode completion zsh)"    (e.g. in ~/.zshrc)
    fish: meshnode completion fish > ~/.config/fish/completions/meshnode.fish
    """
    from click.shell_completion import get_completion_class

    comp_cls = get_completion_class(shell)
    if comp_cls is None:  # click knows the three; a future click might not
        click.echo(f"error: click has no completion for {shell}", err=True)
        sys.exit(1)
    # What `_MESHNODE_COMPLETE=<shell>_source meshnode` prints.
    click.echo(comp_cls(cli, {}, "meshnode", COMPLETE_VAR).source(), nl=False)


def main() -> None:
    try:
        cli(prog_name="meshnode")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
