"""The wire contracts between meshnode's components, defined once.

Each contract is a frozen, slotted dataclass with ``to_json()`` (a plain dict
``json.dumps`` takes) and ``from_json(obj)`` (validating). Producer and consumer
both go through these classes, so the two ends cannot drift:

- the control plane's node slice (``GET /v1/node/config``): :class:`NodeSlice`
  (full), :class:`SliceDelta` (incremental, :class:`SliceChange` entries),
  :class:`SliceUnchanged`; read with :func:`parse_slice_answer`. Its parts are
  :class:`NodeDoc`, :class:`WorkloadDoc` and the service document
  :class:`ServiceDoc` (:class:`ServicePort`, :class:`EndpointDoc`);
- the ztunnel snapshot (agent -> ztunnel), :class:`Snapshot`, schema
  ``SNAPSHOT_SCHEMA``, with :class:`SnapshotWorkload` and the same service
  documents;
- the control messages on ztunnel's Unix socket (agent <-> ztunnel), version
  ``CONTROL_PROTOCOL_VERSION``: :class:`SnapshotMessage`, :class:`AddMessage`,
  :class:`DeleteMessage` (:func:`parse_control_message`) and :class:`Ack` /
  :class:`Nack` (:func:`parse_control_reply`);
- a node's health report (agent -> control plane, ``POST /v1/node/report``),
  schema ``REPORT_SCHEMA``: :class:`NodeReport` with :class:`EndpointHealth`
  and :class:`TrafficEdge` (also what ztunnel's ``/report`` admin path serves),
  bounded by :func:`fit`.

Validation rules, the same for every contract:

- every field is checked with the validators below (DNS labels, ports, IP
  addresses -- normalised, ``"FD00::1"`` becomes ``"fd00::1"`` -- trust domains
  and SPIFFE IDs via :mod:`meshnode.core.identity`); a :class:`ContractError`
  names the field's path, e.g. ``snapshot.services[0].endpoints[1].port``;
- **unknown fields are refused**: a misspelt field silently ignored would route
  or authorize differently from what its author meant. A new field therefore
  comes with a new ``SNAPSHOT_SCHEMA`` / ``CONTROL_PROTOCOL_VERSION`` (the slice
  travels with the node's release, like the snapshot);
- an optional field may be absent or ``null``; both mean its default.

Modules: ``validate`` (the validators), ``documents`` (node, workload, service),
``slice``, ``snapshot``, ``control``, ``report``; import from this package.

docs/protocol.md shows an example of each and points here.
"""

from __future__ import annotations

from meshnode.core.contracts.control import (
    CONTROL_PROTOCOL_VERSION,
    Ack,
    AddMessage,
    ControlMessage,
    ControlReply,
    DeleteMessage,
    Nack,
    SnapshotMessage,
    parse_control_message,
    parse_control_reply,
)
from meshnode.core.contracts.documents import (
    EndpointDoc,
    NodeDoc,
    Revocation,
    ServiceDoc,
    ServicePort,
    WorkloadDoc,
)
from meshnode.core.contracts.report import (
    MAX_REPORT_BYTES,
    REPORT_SCHEMA,
    EndpointHealth,
    NodeReport,
    TrafficEdge,
)
from meshnode.core.contracts.slice import (
    AnswerLines,
    NodeSlice,
    SliceAnswer,
    SliceChange,
    SliceDelta,
    SliceUnchanged,
    parse_slice_answer,
)
from meshnode.core.contracts.snapshot import (
    SNAPSHOT_SCHEMA,
    Snapshot,
    SnapshotWorkload,
)
from meshnode.core.contracts.validate import (
    ContractError,
    check_identity,
    check_ip,
    check_label,
    check_port,
    check_trust_domain,
    check_version_label,
    resource_key,
)

__all__ = [
    "AnswerLines",
    "Ack",
    "AddMessage",
    "CONTROL_PROTOCOL_VERSION",
    "ContractError",
    "ControlMessage",
    "ControlReply",
    "DeleteMessage",
    "EndpointDoc",
    "EndpointHealth",
    "MAX_REPORT_BYTES",
    "Nack",
    "NodeDoc",
    "NodeReport",
    "REPORT_SCHEMA",
    "NodeSlice",
    "Revocation",
    "SNAPSHOT_SCHEMA",
    "ServiceDoc",
    "ServicePort",
    "SliceAnswer",
    "SliceChange",
    "SliceDelta",
    "SliceUnchanged",
    "Snapshot",
    "SnapshotMessage",
    "SnapshotWorkload",
    "TrafficEdge",
    "WorkloadDoc",
    "check_identity",
    "check_ip",
    "check_label",
    "check_port",
    "check_trust_domain",
    "check_version_label",
    "parse_control_message",
    "parse_control_reply",
    "parse_slice_answer",
    "resource_key",
]
