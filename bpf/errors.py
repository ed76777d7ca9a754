"""The one exception of meshnode.bpf."""


class BpfError(Exception):
    """An eBPF operation failed; the message says what, why, and what to do."""
