"""meshnode: a node-level service mesh. The code lives in the top-level folders
(core/, bpf/, ztunnel/, nodeagent/, controlplane/, cli/, bench/), installed as
subpackages of this namespace (pyproject.toml maps them).

In a development checkout the editable install is a tree of links
(setuptools' strict editable mode); a process started in the checkout's root
finds this folder first, so the package's path also takes in every other
``meshnode`` folder on sys.path (the link tree among them)."""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
