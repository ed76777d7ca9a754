"""meshnode: a node-level service mesh. The code lives in the top-level folders
(cli/, ztunnel/, nodeagent/, bpf/, controlplane/), installed as subpackages of
this namespace."""

__version__ = "0.1.0"
