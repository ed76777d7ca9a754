"""The one exception of meshnode.bpf."""

from meshnode.core.errors import MeshnodeError


class BpfError(MeshnodeError):
    """An eBPF operation failed; the message says what, why, and what to do."""
