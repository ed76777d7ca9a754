/* Helpers the programs share: is the caller a mesh workload, and the DNS capture.
 *
 * They use maps, so they live in a .c file, not in meshnode.h: bcc rewrites map
 * calls (map.lookup(), map.update()) only in the program text it is given, not in
 * included headers. The loader puts this file first.
 */
#include "meshnode.h"

/* The workload id of the calling task's cgroup, or of its nearest ancestor that is
 * a member (a workload's sub-cgroups are the workload too: a unit with
 * Delegate=yes, a container inside a unit, a process moved into a child group);
 * -ENOENT if neither it nor any ancestor is a member. The exact cgroup is looked
 * up first, so the common case costs one lookup. */
static __always_inline int mn_lookup_workload(__u32 *workload_id)
{
    __u64 cgroup_id = bpf_get_current_cgroup_id();
    struct mn_workload *wl = mn_workloads.lookup(&cgroup_id);
    int found = -ENOENT;

    if (wl) {
        *workload_id = wl->workload_id;
        return 0;
    }
    /* Level 0 is the root; deeper levels overwrite, so the nearest member wins. */
#pragma unroll
    for (int level = 1; level < MN_MAX_CGROUP_DEPTH; level++) {
        __u64 id = bpf_get_current_ancestor_cgroup_id(level);

        if (id == 0 || id == cgroup_id)
            break; /* past our own depth */
        wl = mn_workloads.lookup(&id);
        if (wl) {
            *workload_id = wl->workload_id;
            found = 0;
        }
    }
    return found;
}

/* 0 if a mesh workload's DNS is captured now (the switch is on and the caller is
 * a member), else -ENOENT. */
static __always_inline int mn_dns_captured(void)
{
    __u32 zero = 0;
    __u32 workload_id;
    struct mn_settings *settings = mn_settings.lookup(&zero);

    if (!settings || !settings->capture_dns)
        return -ENOENT;
    return mn_lookup_workload(&workload_id);
}

/* Redirects a socket addressed to ip4:53 (network order) to the DNS proxy and
 * remembers the resolver it asked. 0 = redirected (the caller rewrites the
 * address), -ENOENT = not DNS, not captured, or not recorded. */
static __always_inline int mn_dns_redirect(void *ctx, __u32 ip4, __u32 user_port)
{
    struct mn_dns_orig orig = {};
    __u64 cookie;
    int err;

    if ((__u16)user_port != bpf_htons(MN_DNS_SERVICE_PORT))
        return -ENOENT;
    if (ip4 == bpf_htonl(MN_DNS_IP4))
        return -ENOENT; /* already the proxy */
    err = mn_dns_captured();
    if (err)
        return err;
    orig.ip4 = ip4;
    orig.port = (__u16)user_port;
    cookie = mn_get_socket_cookie(ctx);
    /* Not recorded (never expected of an LRU map): leave the query to the resolver
     * it was meant for rather than make its reply unrecognisable. */
    return mn_dns_asked.update(&cookie, &orig) < 0 ? -ENOENT : 0;
}
