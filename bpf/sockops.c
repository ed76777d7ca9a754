/* sockops: when a redirected socket is about to send its SYN, re-key its
 * original-destination record from the socket cookie to the 4-tuple the proxy
 * will see on accept().
 *
 * Why BPF_SOCK_OPS_TCP_CONNECT_CB: tcp_connect() runs it inside the connect()
 * call, after the local port is bound and before the SYN is sent, so the record
 * is in mn_orig_dst before the proxy can possibly accept the connection. (It also
 * runs for TCP Fast Open's sendmsg.) ACTIVE_ESTABLISHED_CB would run on the
 * SYN-ACK, before the final ACK, so it would be in time too, but only by way of
 * the handshake's ordering; the earlier hook needs no such argument.
 *
 * A record the proxy never consumes (it was not listening, it restarted, the
 * backlog overflowed) must never be picked up by a later socket that happens to
 * get the same 4-tuple: that socket would borrow the first one's workload
 * identity. So when any socket that was NOT redirected connects to the proxy's
 * own address and port (someone dialling 127.0.0.1:15001 directly), a record
 * left under its 4-tuple is deleted before its SYN leaves; a redirected socket
 * overwrites it with its own. The proxy also refuses records older than a few
 * seconds (created_ns). A connect that fails before the SYN leaves its record in
 * mn_cookie_dst, keyed by a cookie that is never reused, until LRU eviction.
 */
#include "meshnode.h"

/* Byte orders in struct bpf_sock_ops: local_port is HOST order. remote_port is
 * the 16-bit network-order port, but where it sits in the u32 depends on the
 * kernel: on little-endian machines most kernels (6.18 here, measured: port
 * 39927 = 0x9bf7 read as 0xf79b0000) shift it into the upper half, some
 * put it in the lower half. A connected socket's port is never 0, so take
 * whichever half is set. Returns network order. */
static __always_inline __u16 mn_sockops_remote_port(__u32 remote_port)
{
    if (remote_port >> 16)
        return (__u16)(remote_port >> 16);
    return (__u16)remote_port;
}

/* Fills key from the socket. Only sockets that connect4/connect6 redirected get
 * here, and both sent them to an IPv4 proxy: an AF_INET socket, or an AF_INET6
 * one connecting to ::ffff:<proxy>, which the kernel hands to tcp_v4_connect().
 * Either way the IPv4 addresses are in skc_rcv_saddr/skc_daddr, which is what
 * local_ip4/remote_ip4 read, so no family switch is needed (reading different
 * ctx fields in branches also tends to make clang emit ctx+offset pointers that
 * the verifier rejects: "dereference of modified ctx ptr"). */
static __always_inline int mn_tuple_of(struct bpf_sock_ops *skops, struct mn_tuple_key *key)
{
    __u32 family = skops->family;

    if (family != AF_INET && family != AF_INET6)
        return -EAFNOSUPPORT;
    key->src_ip4 = skops->local_ip4;
    key->dst_ip4 = skops->remote_ip4;
    key->src_port = bpf_htons((__u16)skops->local_port);
    key->dst_port = mn_sockops_remote_port(skops->remote_port);
    return 0;
}

/* A socket we did not redirect is connecting: if it dials the proxy itself, no
 * record may be waiting under its 4-tuple (see the top of this file). */
static __always_inline int mn_purge_direct(struct bpf_sock_ops *skops)
{
    struct mn_tuple_key key = {};

    if (mn_tuple_of(skops, &key))
        return -ENOENT;
    if (key.dst_ip4 == bpf_htonl(MN_PROXY_IP4) && key.dst_port == bpf_htons(MN_PROXY_PORT))
        mn_orig_dst.delete(&key);
    return -ENOENT;
}

static __always_inline int mn_move_orig_dst(struct bpf_sock_ops *skops)
{
    struct mn_tuple_key key = {};
    struct mn_orig_dst rec;
    struct mn_orig_dst *found;
    __u64 cookie;
    int err;

    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return -EOPNOTSUPP;
    cookie = mn_get_socket_cookie(skops);
    found = mn_cookie_dst.lookup(&cookie);
    if (!found)
        return mn_purge_direct(skops); /* not a socket we redirected */
    rec = *found; /* copy: the element may be reused once deleted */
    mn_cookie_dst.delete(&cookie);
    err = mn_tuple_of(skops, &key);
    if (err)
        return err;
    err = mn_orig_dst.update(&key, &rec);
    return err < 0 ? err : 0;
}

int mn_sockops(struct bpf_sock_ops *skops)
{
    mn_move_orig_dst(skops);
    return 1;
}
