"""The test suite's root. Tests live in ``unit/<component>/`` (pure logic,
in-process sockets on loopback) and ``system/<kind>/`` (real kernels,
processes and servers: root). Shared helpers are in ``support/``; its
control-plane fixtures (a PostgreSQL server, stores) are registered here for
every folder."""

pytest_plugins = ["tests.support.controlplane"]
