/* cgroup/sendmsg4,6 and cgroup/recvmsg4,6: a mesh workload's DNS queries over
 * unconnected UDP go to the node's DNS proxy, and the proxy's replies seem to
 * come from the resolver that was asked (connected UDP and TCP sockets are sent
 * there by connect.c; their replies are rewritten here too).
 *
 * Only members of mn_workloads are touched, and only while the agent has the
 * capture on (mn_settings[0].capture_dns). The resolver asked is remembered per
 * socket (mn_dns_asked), so a reply is rewritten only on a socket that was
 * redirected, and only when it comes from the DNS proxy's own address.
 *
 * sendmsg returns 1 = send (redirected or untouched); recvmsg must return 1.
 */
#include "meshnode.h"

int mn_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (mn_dns_redirect(ctx, ctx->user_ip4, ctx->user_port) == 0) {
        ctx->user_ip4 = bpf_htonl(MN_DNS_IP4);
        ctx->user_port = bpf_htons(MN_DNS_PORT);
    }
    return 1;
}

/* IPv6 sockets: only IPv4-mapped resolvers (::ffff:a.b.c.d) are captured. */
int mn_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return 1;
    if (mn_dns_redirect(ctx, ctx->user_ip6[3], ctx->user_port) == 0) {
        ctx->user_ip6[3] = bpf_htonl(MN_DNS_IP4);
        ctx->user_port = bpf_htons(MN_DNS_PORT);
    }
    return 1;
}

/* The resolver this socket asked, if the datagram is the DNS proxy's reply. */
static __always_inline struct mn_dns_orig *mn_dns_reply_of(void *ctx, __u32 ip4, __u32 port)
{
    __u64 cookie;

    if (ip4 != bpf_htonl(MN_DNS_IP4) || (__u16)port != bpf_htons(MN_DNS_PORT))
        return 0;
    cookie = mn_get_socket_cookie(ctx);
    return mn_dns_asked.lookup(&cookie);
}

int mn_recvmsg4(struct bpf_sock_addr *ctx)
{
    struct mn_dns_orig *orig = mn_dns_reply_of(ctx, ctx->user_ip4, ctx->user_port);

    if (orig) {
        ctx->user_ip4 = orig->ip4;
        ctx->user_port = orig->port;
    }
    return 1;
}

int mn_recvmsg6(struct bpf_sock_addr *ctx)
{
    struct mn_dns_orig *orig;

    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return 1;
    orig = mn_dns_reply_of(ctx, ctx->user_ip6[3], ctx->user_port);
    if (orig) {
        ctx->user_ip6[3] = orig->ip4;
        ctx->user_port = orig->port;
    }
    return 1;
}
