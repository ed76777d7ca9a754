"""meshnode lab: network namespaces as nodes, one machine, real kernel."""
