/* cgroup/connect4 and cgroup/connect6: send a mesh workload's TCP connects to
 * mesh destinations to the node proxy, remembering where they were going; and,
 * with DNS capture on, its UDP and TCP connects to port 53 to the DNS proxy.
 *
 * Every helper returns 0 when it redirected the socket and a negative errno when
 * it did not. "Not ours" (-ENOENT, -EPROTONOSUPPORT, -EAFNOSUPPORT) lets the
 * connect go ahead untouched. Any other error means a mesh workload dialled a
 * mesh destination and we could not record it: the connect is refused (EPERM)
 * rather than let it reach a mesh workload in plaintext, around mTLS. Fail
 * closed.
 */
#include "meshnode.h"

/* 0 if ip4:port (network order) is a mesh destination, exactly or by wildcard. */
static __always_inline int mn_lookup_destination(__u32 ip4, __u16 port)
{
    struct mn_dest_key key = {};

    key.ip4 = ip4;
    key.port = port;
    if (mn_dests.lookup(&key))
        return 0;
    key.port = 0;
    if (mn_dests.lookup(&key))
        return 0;
    return -ENOENT;
}

/* Checks membership and destination, then records the original destination under
 * the socket cookie. On 0 the caller must rewrite the destination. */
static __always_inline int mn_record_orig_dst(void *ctx, __u32 ip4, __u16 port)
{
    struct mn_orig_dst rec = {};
    __u64 cookie;
    int err;

    err = mn_lookup_workload(&rec.workload_id);
    if (err)
        return err;
    err = mn_lookup_destination(ip4, port);
    if (err)
        return err;
    rec.ip4 = ip4;
    rec.port = port;
    rec.created_ns = bpf_ktime_get_ns();
    cookie = mn_get_socket_cookie(ctx);
    err = mn_cookie_dst.update(&cookie, &rec);
    return err < 0 ? err : 0;
}

static __always_inline int mn_redirect4(struct bpf_sock_addr *ctx)
{
    int err;

    /* DNS first (UDP connect()ed by glibc's resolver, or TCP): to the DNS proxy. */
    err = mn_dns_redirect(ctx, ctx->user_ip4, ctx->user_port);
    if (err == 0) {
        ctx->user_ip4 = bpf_htonl(MN_DNS_IP4);
        ctx->user_port = bpf_htons(MN_DNS_PORT);
        return 0;
    }
    if (err != -ENOENT)
        return err;
    if (ctx->protocol != IPPROTO_TCP)
        return -EPROTONOSUPPORT;
    /* user_port: network order in the low 16 bits of a u32. */
    err = mn_record_orig_dst(ctx, ctx->user_ip4, (__u16)ctx->user_port);
    if (err)
        return err;
    ctx->user_ip4 = bpf_htonl(MN_PROXY_IP4);
    ctx->user_port = bpf_htons(MN_PROXY_PORT);
    return 0;
}

/* IPv6 sockets: only IPv4-mapped destinations (::ffff:a.b.c.d) are in the mesh.
 * The same steps as mn_redirect4, on user_ip6[3]: a connect6 program may not touch
 * user_ip4 (the verifier checks ctx fields against the attach type), so the two
 * families keep their own rewrites. */
static __always_inline int mn_redirect6(struct bpf_sock_addr *ctx)
{
    int err;

    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return -EAFNOSUPPORT;
    err = mn_dns_redirect(ctx, ctx->user_ip6[3], ctx->user_port);
    if (err == 0) {
        ctx->user_ip6[3] = bpf_htonl(MN_DNS_IP4);
        ctx->user_port = bpf_htons(MN_DNS_PORT);
        return 0;
    }
    if (err != -ENOENT)
        return err;
    if (ctx->protocol != IPPROTO_TCP)
        return -EPROTONOSUPPORT;
    err = mn_record_orig_dst(ctx, ctx->user_ip6[3], (__u16)ctx->user_port);
    if (err)
        return err;
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
    ctx->user_ip6[3] = bpf_htonl(MN_PROXY_IP4);
    ctx->user_port = bpf_htons(MN_PROXY_PORT);
    return 0;
}

/* 1 = allow the connect (redirected or not ours), 0 = refuse it with EPERM. */
static __always_inline int mn_verdict(int err)
{
    if (err == 0 || err == -ENOENT || err == -EPROTONOSUPPORT || err == -EAFNOSUPPORT)
        return 1;
    return 0;
}

int mn_connect4(struct bpf_sock_addr *ctx)
{
    return mn_verdict(mn_redirect4(ctx));
}

int mn_connect6(struct bpf_sock_addr *ctx)
{
    return mn_verdict(mn_redirect6(ctx));
}
