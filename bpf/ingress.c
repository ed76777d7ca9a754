/* cgroup_skb/ingress: STRICT mode. A workload's port listed in mn_strict may be
 * reached only by the node proxy, which delivers inbound connections from
 * MN_PROXY_INBOUND_SRC_IP4 (127.0.0.6) over loopback. Every other packet to such
 * a socket is dropped, so plaintext from outside the mesh never reaches it.
 *
 * The program runs for each packet just before it is queued to a socket of the
 * cgroup subtree (sk_filter(): for TCP in tcp_v4_rcv()/tcp_v6_rcv(), so after IP
 * reassembly), in softirq context. Whose packet it is comes from the receiving
 * socket, which the kernel puts in skb->sk for the program's duration:
 *   - the cgroup: bpf_skb_cgroup_id(skb) = the cgroup of skb->sk, or one of its
 *     ancestors (bpf_skb_ancestor_cgroup_id) for a workload's sub-cgroups. NOT
 *     bpf_get_current_cgroup_id(): "current" is whatever task the softirq
 *     interrupted, usually the sender (tests/test_bpf_strict.py measures both).
 *     A SYN and the handshake's last ACK are filtered by the listener; an
 *     accepted socket inherits the listener's cgroup.
 *   - the port: the socket's local port, which for TCP is the packet's
 *     destination port; reading it from the socket needs no TCP header parsing
 *     (and no walking of IPv6 extension headers).
 * The source address comes from the IP header, which is where skb data starts
 * for cgroup_skb programs. An AF_INET6 socket receiving IPv4 (a dual-stack
 * listener, peers seen as ::ffff:a.b.c.d) still gets an IPv4 header here.
 *
 * Helpers return 0 = let it through, negative errno = why not; "not ours" is 0.
 * Fail closed: a packet for a STRICT socket that is not provably the proxy's
 * (native IPv6, an unreadable header, a 127.0.0.6 source that did not come in
 * over loopback) is dropped.
 */
#include "meshnode.h"

#define MN_LOOPBACK_IFINDEX 1 /* "lo" has ifindex 1 in every network namespace */
#define MN_ETH_P_IP   0x0800
#define MN_ETH_P_IPV6 0x86DD

/* 0 if skb goes to a TCP socket whose (cgroup, local port) is STRICT, -ENOENT
 * if it goes elsewhere (or to a socket we cannot see: then it is not ours). */
static __always_inline int mn_strict_socket(struct __sk_buff *skb)
{
    struct mn_strict_key key = {};
    struct bpf_sock *sk = skb->sk;

    if (!sk)
        return -ENOENT;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return -ENOENT;
    if (sk->protocol != IPPROTO_TCP)
        return -ENOENT;
    key.cgroup_id = bpf_skb_cgroup_id(skb);
    key.port = bpf_htons((__u16)sk->src_port); /* src_port: local port, host order */
    if (mn_strict.lookup(&key))
        return 0;
    /* A socket in a sub-cgroup of a STRICT workload is that workload's too. */
    __u64 self = key.cgroup_id;
#pragma unroll
    for (int level = 1; level < MN_MAX_CGROUP_DEPTH; level++) {
        __u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

        if (id == 0 || id == self)
            break;
        key.cgroup_id = id;
        if (mn_strict.lookup(&key))
            return 0;
    }
    return -ENOENT;
}

/* 0 if the packet is the node proxy's: IPv4 from MN_PROXY_INBOUND_SRC_IP4 that
 * arrived over loopback (127.0.0.0/8 from a wire is a spoof that only
 * route_localnet=1 lets in). -EACCES otherwise. */
static __always_inline int mn_from_proxy(struct __sk_buff *skb)
{
    __u8 version;
    __u32 saddr;

    if (skb->protocol != bpf_htons(MN_ETH_P_IP))
        return -EACCES; /* native IPv6: the proxy delivers over IPv4 only */
    if (bpf_skb_load_bytes(skb, 0, &version, sizeof(version)) < 0 || (version >> 4) != 4)
        return -EACCES;
    /* struct iphdr: saddr at byte 12, network order. */
    if (bpf_skb_load_bytes(skb, 12, &saddr, sizeof(saddr)) < 0)
        return -EACCES;
    if (saddr != bpf_htonl(MN_PROXY_INBOUND_SRC_IP4))
        return -EACCES;
    if (skb->ingress_ifindex != MN_LOOPBACK_IFINDEX)
        return -EACCES;
    return 0;
}

/* 0 = deliver, -EACCES = drop. */
static __always_inline int mn_strict_check(struct __sk_buff *skb)
{
    if (mn_strict_socket(skb) < 0)
        return 0; /* not a STRICT port: PERMISSIVE or not a workload */
    return mn_from_proxy(skb);
}

/* 1 = deliver, 0 = drop. */
int mn_ingress(struct __sk_buff *skb)
{
    return mn_strict_check(skb) < 0 ? 0 : 1;
}
