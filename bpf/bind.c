/* cgroup/bind4 and cgroup/bind6: nothing on the node but the node proxy may
 * bind the proxy's delivery address (MN_PROXY_INBOUND_SRC_IP4, 127.0.0.6) or one
 * of its ports (mn_guarded_ports: outbound, HBONE, admin, metrics, readiness).
 *
 * Why: in STRICT mode a workload admits only connections from 127.0.0.6 over
 * loopback (ingress.c). A local process that could bind 127.0.0.6 would pass
 * STRICT in plaintext; one that could bind a proxy port (SO_REUSEPORT, or first
 * after a proxy restart) could receive redirected connections or pose as the
 * admin endpoints. The proxy is recognised by its cgroup (mn_proxy_cgroups,
 * nearest ancestor included), which the node agent sets from the proxy's systemd
 * unit or the lab's proxy cgroup -- never by address or port.
 *
 * Until the agent switches the guard on (mn_settings[0].guard_bind) nothing is
 * refused. Returns 1 = allow the bind, 0 = refuse it with EPERM.
 */
#include "meshnode.h"

/* 0 if the calling task's cgroup or one of its ancestors is the proxy's. */
static __always_inline int mn_caller_is_proxy(void)
{
    __u64 cgroup_id = bpf_get_current_cgroup_id();

    if (mn_proxy_cgroups.lookup(&cgroup_id))
        return 0;
#pragma unroll
    for (int level = 1; level < MN_MAX_CGROUP_DEPTH; level++) {
        __u64 id = bpf_get_current_ancestor_cgroup_id(level);

        if (id == 0 || id == cgroup_id)
            break;
        if (mn_proxy_cgroups.lookup(&id))
            return 0;
    }
    return -EPERM;
}

/* 0 if binding ip4:port (network order) is reserved for the proxy, -ENOENT if
 * anyone may (or the guard is off). ip4 == 0 for a native IPv6 address. */
static __always_inline int mn_reserved(__u32 ip4, __u16 port)
{
    __u32 zero = 0;
    struct mn_settings *settings = mn_settings.lookup(&zero);

    if (!settings || !settings->guard_bind)
        return -ENOENT;
    if (ip4 == bpf_htonl(MN_PROXY_INBOUND_SRC_IP4))
        return 0;
    if (port != 0 && mn_guarded_ports.lookup(&port))
        return 0;
    return -ENOENT;
}

static __always_inline int mn_bind_verdict(__u32 ip4, __u16 port)
{
    if (mn_reserved(ip4, port) < 0)
        return 1;
    return mn_caller_is_proxy() == 0 ? 1 : 0;
}

int mn_bind4(struct bpf_sock_addr *ctx)
{
    return mn_bind_verdict(ctx->user_ip4, (__u16)ctx->user_port);
}

int mn_bind6(struct bpf_sock_addr *ctx)
{
    __u32 ip4 = 0;

    /* ::ffff:a.b.c.d reaches IPv4 peers as a.b.c.d: check it as that address. */
    if (ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
        ctx->user_ip6[2] == bpf_htonl(0x0000ffff))
        ip4 = ctx->user_ip6[3];
    return mn_bind_verdict(ip4, (__u16)ctx->user_port);
}
