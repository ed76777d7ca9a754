"""The one exception of meshnode.bpf."""

from meshnode.core.errors import MeshnodeError


class BpfError(MeshnodeError):
    """An eBPF operation failed; the message says what, why, and what to do."""


class MapFullError(BpfError):
    """A map cannot hold what the node needs. Nothing of the new set was written:
    the map keeps its previous entries (never half a set)."""
