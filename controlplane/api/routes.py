"""The control-plane API's one route table: method, path, handler, auth, body cap.

Authentication is a declared property of each route (:class:`~.auth.Auth`), checked
by the app before the handler runs and before any of the body is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshnode.core import api
from meshnode.core.contracts.report import MAX_REPORT_BYTES

from .auth import Auth

__all__ = ["MAX_BODY", "ROUTES", "SMALL_BODY", "Route"]

MAX_BODY = 4 << 20  # policy YAML
SMALL_BODY = 64 << 10  # JSON with a CSR or a few fields
ZONE_STATE_BODY = 2 << 20  # a zone's services (core/contracts/zone.py MAX_ZONE_SERVICES)


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # an aiohttp template from meshnode.core.api
    handler: str  # the name of the ControlPlane method
    auth: Auth
    max_body: int = 0  # 0: the route takes no body


ROUTES: tuple[Route, ...] = (
    Route("GET", api.TRUST_BUNDLE, "get_trust_bundle", Auth.PUBLIC),
    Route("POST", api.ENROLL, "post_enroll", Auth.TOKEN, SMALL_BODY),
    Route("GET", api.NODE_CONFIG, "get_node_config", Auth.NODE),
    Route("POST", api.NODE_WORKLOADS, "post_node_workload", Auth.NODE, SMALL_BODY),
    Route("DELETE", api.NODE_WORKLOAD, "delete_node_workload", Auth.NODE),
    Route("POST", api.NODE_CERTIFICATES, "post_node_certificate", Auth.NODE, SMALL_BODY),
    Route("POST", api.NODE_RENEW, "post_node_renew", Auth.NODE, SMALL_BODY),
    Route("POST", api.NODE_REPORT, "post_node_report", Auth.NODE, MAX_REPORT_BYTES),
    Route("POST", api.ADMIN_TOKENS, "post_admin_token", Auth.ADMIN, SMALL_BODY),
    Route("POST", api.ADMIN_RESOURCES, "post_admin_resources", Auth.ADMIN, MAX_BODY),
    Route("GET", api.ADMIN_RESOURCES, "get_admin_resources", Auth.ADMIN),
    Route("DELETE", api.ADMIN_RESOURCE, "delete_admin_resource", Auth.ADMIN),
    Route("GET", api.ADMIN_NODES, "get_admin_nodes", Auth.ADMIN),
    Route("DELETE", api.ADMIN_NODE, "delete_admin_node", Auth.ADMIN),
    Route("GET", api.ADMIN_SERVICES, "get_admin_services", Auth.ADMIN),
    Route("GET", api.ADMIN_WORKLOADS, "get_admin_workloads", Auth.ADMIN),
    Route("DELETE", api.ADMIN_WORKLOAD, "delete_admin_workload", Auth.ADMIN),
    Route("POST", api.ADMIN_CA_ROTATE, "post_admin_rotate", Auth.ADMIN, SMALL_BODY),
    Route("GET", api.ADMIN_ZONES, "get_admin_zones", Auth.ADMIN),
    Route("POST", api.ZONE_ENROLL, "post_zone_enroll", Auth.TOKEN, SMALL_BODY),
    Route("PUT", api.ZONE_STATE, "put_zone_state", Auth.ZONE, ZONE_STATE_BODY),
    Route("GET", api.ZONE_CONFIG, "get_zone_config", Auth.ZONE),
    Route("POST", api.ZONE_INTERMEDIATE, "post_zone_intermediate", Auth.ZONE, SMALL_BODY),
)
