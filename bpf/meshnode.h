/* meshnode eBPF: the shared structs, every map, and the pin names.
 *
 * Programs: mn_connect4/mn_connect6 (connect.c) and mn_sockops (sockops.c) send
 * workloads' outbound connections to the node proxy; mn_sendmsg4/6,
 * mn_recvmsg4/6 (dns.c) and connect.c send their DNS queries to the node's mesh
 * DNS proxy and make its replies seem to come from the resolver that was asked;
 * mn_ingress (ingress.c)
 * enforces STRICT mode on their inbound ones; mn_bind4/mn_bind6 (bind.c) keep
 * every process but the node proxy off the delivery address and the proxy's
 * ports, so nothing local can pose as the proxy.
 *
 * This is the single C definition of everything userspace also sees; the Python
 * mirror is bpf/layout.py and tests/test_bpf_layout.py compiles this header with
 * gcc (-DMESHNODE_USERSPACE) to check that both agree byte for byte.
 *
 * Byte orders: every IPv4 address and port stored in a map is in NETWORK order,
 * exactly as the kernel holds it in struct bpf_sock_addr (user_ip4, user_port).
 * Only bpf_sock_ops needs converting; see mn_sockops_remote_port() in sockops.c.
 * Cgroup ids are the cgroup v2 ids (the directory's inode number), host order.
 */
#ifndef MESHNODE_H
#define MESHNODE_H

#ifdef MESHNODE_USERSPACE
#include <linux/types.h>
#else
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#endif

/* Pin names, files under the agent's pin directory in bpffs (layout.py: PIN_*). */
#define MN_PIN_ORIG_DST     "mn_orig_dst"
#define MN_PIN_WORKLOADS    "mn_workloads"
#define MN_PIN_DESTINATIONS "mn_dests"
#define MN_PIN_STRICT       "mn_strict"

/* The source address the node proxy binds for the connections it delivers to
 * workloads (as Istio's ztunnel does). In STRICT mode it is the only source that
 * may reach a workload's mesh port. Host order, so userspace can check it too. */
#define MN_PROXY_INBOUND_SRC_IP4 0x7f000006u /* 127.0.0.6 */

/* Capacities. The per-connection maps are LRU: a record nobody consumes (the
 * connect failed, the proxy died) is evicted instead of growing the map. */
#define MN_MAX_CONNS        65536
#define MN_MAX_WORKLOADS    4096
#define MN_MAX_DESTINATIONS 16384
#define MN_MAX_STRICT       16384
#define MN_MAX_PROXY_CGROUPS 16
#define MN_MAX_GUARDED_PORTS 64
#define MN_MAX_DNS_SOCKETS  65536

/* Key of mn_dests: a mesh destination. port == 0 means any port of that address. */
struct mn_dest_key {
    __u32 ip4;   /* network order */
    __u16 port;  /* network order; 0 = wildcard */
    __u16 pad;   /* always 0 */
};

/* Value of mn_dests. */
struct mn_dest_info {
    __u32 flags; /* reserved, 0 */
};

/* How deep below the cgroup v2 root the programs look for a member ancestor of a
 * socket's cgroup (systemd: system.slice/x.service/child is level 3). */
#define MN_MAX_CGROUP_DEPTH 16

/* Value of mn_workloads (key: __u64 cgroup v2 id of the workload's cgroup; a
 * socket's own cgroup or its nearest ancestor in the map decides). */
struct mn_workload {
    __u32 workload_id; /* assigned by the node agent */
};

/* Key of mn_strict: a port a workload (cgroup) listens on in STRICT mode. */
struct mn_strict_key {
    __u64 cgroup_id; /* cgroup v2 id of the listening socket's cgroup */
    __u16 port;      /* the socket's local port, network order */
    __u16 pad[3];    /* always 0 (hashed as part of the key) */
};

/* Value of mn_strict. */
struct mn_strict_info {
    __u32 flags; /* reserved, 0 */
};

/* What a connect() originally asked for; value of mn_cookie_dst and mn_orig_dst. */
struct mn_orig_dst {
    __u32 ip4;         /* network order */
    __u16 port;        /* network order */
    __u16 pad;         /* always 0 */
    __u32 workload_id; /* of the connecting cgroup */
    __u32 pad2;        /* always 0 */
    __u64 created_ns;  /* bpf_ktime_get_ns() at connect(): CLOCK_MONOTONIC; the
                        * proxy refuses records older than its limit */
};

/* Value of mn_proxy_cgroups (key: __u64 cgroup v2 id of the node proxy's cgroup;
 * the calling task's cgroup or an ancestor of it must be in the map). */
struct mn_proxy_info {
    __u32 flags; /* reserved, 0 */
};

/* Value of mn_settings[0]. */
struct mn_settings {
    __u32 guard_bind;  /* 1: only mn_proxy_cgroups may bind the delivery address or
                        * a port in mn_guarded_ports (set once the agent knows the
                        * proxy's cgroup) */
    __u32 capture_dns; /* 1: mesh workloads' DNS (UDP and TCP to port 53) goes to
                        * the DNS proxy (MN_DNS_IP4:MN_DNS_PORT) */
};

/* The resolver a redirected DNS socket asked; value of mn_dns_asked. */
struct mn_dns_orig {
    __u32 ip4;  /* network order */
    __u16 port; /* network order */
    __u16 pad;  /* always 0 */
};

/* Key of mn_orig_dst: the connection as the proxy sees it after accept(). */
struct mn_tuple_key {
    __u32 src_ip4;  /* client's local address, network order */
    __u32 dst_ip4;  /* proxy address, network order */
    __u16 src_port; /* client's local port, network order */
    __u16 dst_port; /* proxy port, network order */
};

#ifndef MESHNODE_USERSPACE

/* Where redirected connections go, set by the loader with
 * -DMN_PROXY_IP4=<host-order u32> -DMN_PROXY_PORT=<host-order port>. No default
 * here: the Python side (MeshBpf) is the one place that chooses them. */
#if !defined(MN_PROXY_IP4) || !defined(MN_PROXY_PORT)
#error "compile with -DMN_PROXY_IP4=... -DMN_PROXY_PORT=... (meshnode.bpf.loader does)"
#endif
/* Where captured DNS goes (-DMN_DNS_IP4=<host-order u32> -DMN_DNS_PORT=<port>). */
#if !defined(MN_DNS_IP4) || !defined(MN_DNS_PORT)
#error "compile with -DMN_DNS_IP4=... -DMN_DNS_PORT=... (meshnode.bpf.loader does)"
#endif
#define MN_DNS_SERVICE_PORT 53

/* bcc 0.26 declares bpf_get_socket_cookie() as returning u32, which truncates the
 * 64-bit cookie; call the helper through a correct prototype. */
static __u64 (*mn_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/* Membership: which cgroups are mesh workloads.
 * Written by: the node agent (MeshBpf.sync_workloads); pinned as MN_PIN_WORKLOADS.
 * Read by: mn_connect4, mn_connect6. */
BPF_TABLE("hash", __u64, struct mn_workload, mn_workloads, MN_MAX_WORKLOADS);

/* Destinations that are in the mesh: (ip, port) or (ip, 0) for every port.
 * Written by: the node agent (MeshBpf.sync_destinations); pinned as
 * MN_PIN_DESTINATIONS.
 * Read by: mn_connect4, mn_connect6. */
BPF_TABLE("hash", struct mn_dest_key, struct mn_dest_info, mn_dests, MN_MAX_DESTINATIONS);

/* Original destination of a redirected socket, by socket cookie; lives from
 * connect() until the SYN is about to leave.
 * Written by: mn_connect4, mn_connect6.
 * Read and deleted by: mn_sockops (BPF_SOCK_OPS_TCP_CONNECT_CB). */
BPF_TABLE("lru_hash", __u64, struct mn_orig_dst, mn_cookie_dst, MN_MAX_CONNS);

/* Original destination of a redirected connection, by 4-tuple as accepted.
 * Written by: mn_sockops.
 * Read and deleted by: the proxy (meshnode.bpf.pinned.OrigDstTable.pop), through
 * the pin MN_PIN_ORIG_DST. */
BPF_TABLE("lru_hash", struct mn_tuple_key, struct mn_orig_dst, mn_orig_dst, MN_MAX_CONNS);

/* STRICT mode: (cgroup, port) pairs that only the node proxy may reach, from
 * MN_PROXY_INBOUND_SRC_IP4 over loopback. Absent = PERMISSIVE (no enforcement).
 * Written by: the node agent (MeshBpf.sync_strict); pinned as MN_PIN_STRICT.
 * Read by: mn_ingress. */
BPF_TABLE("hash", struct mn_strict_key, struct mn_strict_info, mn_strict, MN_MAX_STRICT);

/* The node proxy's cgroups: only they may bind the delivery address and the
 * guarded ports.
 * Written by: the node agent (MeshBpf.guard_proxy).
 * Read by: mn_bind4, mn_bind6. */
BPF_TABLE("hash", __u64, struct mn_proxy_info, mn_proxy_cgroups, MN_MAX_PROXY_CGROUPS);

/* Ports only the node proxy may bind, on any address (network order).
 * Written by: the node agent (MeshBpf.guard_proxy). Read by: mn_bind4, mn_bind6. */
BPF_TABLE("hash", __u16, __u32, mn_guarded_ports, MN_MAX_GUARDED_PORTS);

/* Switches. Written by: the node agent. Read by: mn_bind4, mn_bind6, and the
 * DNS capture (members.c). */
BPF_TABLE("array", __u32, struct mn_settings, mn_settings, 1);

/* The resolver each redirected DNS socket asked, by socket cookie, so a reply
 * from the DNS proxy can be shown as coming from it.
 * Written by: mn_connect4/6 (UDP and TCP to port 53), mn_sendmsg4/6.
 * Read by: mn_recvmsg4/6. LRU: a socket that went away is evicted. */
BPF_TABLE("lru_hash", __u64, struct mn_dns_orig, mn_dns_asked, MN_MAX_DNS_SOCKETS);

#endif /* !MESHNODE_USERSPACE */

#endif /* MESHNODE_H */
