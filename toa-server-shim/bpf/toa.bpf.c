// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * toa.bpf.c: the kernel helper of toa-server-shim.
 *
 * Makes accept() and getpeername() of unmodified servers in a cgroup return
 * the client a TOA load balancer wrote into a TCP option, and only when the
 * packet that carried the option came from a trusted source.
 *
 * sockops (toa_sockops):
 *   LISTEN_CB            keep the SYN of every connection (TCP_SAVE_SYN)
 *   PASSIVE_ESTABLISHED  look for the TOA in the SYN, then in the ACK that
 *                        completes the handshake; if neither has one, watch
 *                        the next client segments (DPVS puts it in data)
 * sockops (toa_sockops_data):
 *   PARSE_HDR_OPT        those segments, until found or a few have passed
 * cgroup/getpeername4|6  rewrite the peer address from the socket's storage
 *
 * UDP (UOA, see find_uoa.h), unless attached with --no-udp:
 * classifier (toa_udp_ingress), tc ingress of the backend's interfaces:
 *                        record (LB address:port, local port) -> client from
 *                        trusted UOAs in a bounded LRU map (and the way back),
 *                        turn opp datagrams into plain UDP (the IP stack
 *                        drops protocol 248); ipo options are left in place
 * cgroup/recvmsg4|6      show the client to recvfrom()/recvmsg()
 * cgroup/sendmsg4|6, connect4|6
 *                        a datagram to such a client goes to its LB instead
 *
 * Built by scripts/build-bpf.sh (clang -target bpf); the object is committed.
 * The layouts of struct toa_peer, toa_config, toa_meta and the trie key are
 * mirrored in src/ebpf.rs: change both together.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_TCP 6
#define TCP_SAVE_SYN 27

#include "find_toa.h"
#include "find_uoa.h"

/* Counters (toa_counters indexes). */
#define CNT_FOUND 0     /* trusted TOA stored for a connection */
#define CNT_UNTRUSTED 1 /* connections from peers outside the trust list: not searched */
#define CNT_MALFORMED 2 /* malformed options where a TOA was looked for */
#define CNT_V6_ON_V4 3  /* IPv6 client on an IPv4 socket: no rewrite */
#define CNT_REWRITTEN 4 /* getpeername()/accept() answers rewritten */
#define CNT_UDP_FOUND 5     /* trusted UOAs recorded */
#define CNT_UDP_UNTRUSTED 6 /* UOAs from sources outside the trust list, ignored */
#define CNT_UDP_MALFORMED 7 /* malformed UOAs or opp headers (passed as they are) */
#define CNT_UDP_STRIPPED 8  /* opp headers removed */
#define CNT_UDP_RECV 9      /* recvfrom()/recvmsg() answers rewritten */
#define CNT_UDP_SEND 10     /* datagrams (or connects) to a client sent to its LB */
#define CNT_UDP_CARRIER 11  /* empty datagrams that only carried a trusted UOA, dropped */
#define NR_COUNTERS 12

/* toa_peer.state */
#define ST_NONE 0    /* nothing found (yet) */
#define ST_WATCH 1   /* watching data segments */
#define ST_FOUND 2   /* client set */

/* toa_peer.source: which packet carried the TOA */
#define SRC_SYN 1
#define SRC_ACK 2
#define SRC_DATA 3

/* How many client segments after the handshake are searched. */
#define MAX_DATA_SEGMENTS 4

struct toa_peer {
	__u8 state;
	__u8 source;
	__u8 returned;  /* the address was handed out: never change it again */
	__u8 family;    /* of the client: AF_INET or AF_INET6 */
	__u8 segments;  /* data segments searched */
	__u8 pad[1];
	__u16 port;     /* client port, network order (0 for ali-cdn) */
	__u32 addr[4];  /* client address, network order; IPv4 in addr[0] */
	__u32 lb_addr[4]; /* the real peer (the LB), IPv4 as ::ffff:a.b.c.d */
	__u16 lb_port;  /* network order */
	__u16 pad2;
};

struct toa_config {
	__u8 enabled;            /* bit per format */
	__u8 kinds[NR_FORMATS];  /* option kind per format */
	__u8 trust_any;          /* honour a TOA from any source */
	__u8 pad;
	/* kind -> bits of the enabled formats using that kind, filled by the
	 * loader: one lookup per option keeps the verifier's work small. */
	__u8 kind_formats[256];
};

struct trust_key {
	__u32 prefixlen;  /* of the IPv6 (or ::ffff:IPv4) address */
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct toa_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct trust_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_trust SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct toa_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_counters SEC(".maps");

/* Where the helper is attached (the cgroup path), for `toa-shim ebpf status`:
 * kept here so that all of the helper's state lives under its pin directory. */
struct toa_meta {
	char cgroup[256];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct toa_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_meta SEC(".maps");

/* UDP flows, keyed as the backend's sockets see them: the LB's address
 * (IPv4 as ::ffff:a.b.c.d) and port, and the local port. The local address
 * is not in the key: a recvmsg hook cannot know it for a wildcard socket. */
struct udp_key {
	__u32 lb_addr[4];
	__u16 lb_port;     /* network order */
	__u16 local_port;  /* network order */
};

/* The way back: a client (IPv4 as ::ffff:a.b.c.d) and the local port. */
struct udp_rkey {
	__u32 client_addr[4];
	__u16 client_port; /* network order */
	__u16 local_port;  /* network order */
};

/* Where replies to that client go: its LB (IPv4 as ::ffff:a.b.c.d). */
struct udp_lb {
	__u32 addr[4];
	__u16 port;        /* network order */
	__u16 pad;
};

/* Both LRU maps are sized by the loader (--udp-flows). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_key);
	__type(value, struct uoa_client);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_udp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_rkey);
	__type(value, struct udp_lb);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} toa_udp_replies SEC(".maps");

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&toa_counters, &counter);
	if (value)
		*value += 1;
}

/* Copies the options of the TCP header [data, data_end) into opts; returns their length or -1. */
static __always_inline int copy_options(const __u8 *data, const __u8 *data_end, __u8 *opts)
{
	if (data + 20 > data_end)
		return -1;
	int hlen = (data[12] >> 4) * 4;
	if (hlen < 20 || hlen > 60)
		return -1;
	int len = hlen - 20;
	for (int k = 0; k < 40; k++) {
		if (k >= len)
			break;
		const __u8 *p = data + 20 + k;
		if (p + 1 > data_end)
			return -1;
		opts[k & 63] = *p;
	}
	return len;
}

/* Reads a context field at a constant offset. clang may otherwise share one
 * computed base pointer between remote_ip4 and remote_ip6 accesses, and the
 * verifier refuses loads through a modified context pointer. */
#define CTX_READ(field) ({ __u32 __v; asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(__v) : "r"(skops), "i"(__builtin_offsetof(struct bpf_sock_ops, field))); __v; })

/* Whether a packet from addr (16 bytes, IPv4 as ::ffff:a.b.c.d) is trusted. */
static __always_inline int trusted_addr(const __u32 *addr, const struct toa_config *cfg)
{
	if (cfg->trust_any)
		return 1;
	struct trust_key key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&toa_trust, &key) != NULL;
}

/* Whether the connection's peer is trusted. */
static __always_inline int trusted(const struct bpf_sock_ops *skops, const struct toa_config *cfg)
{
	__u32 addr[4] = {};
	if (skops->family == AF_INET) {
		addr[2] = bpf_htonl(0xffff);
		addr[3] = CTX_READ(remote_ip4);
	} else {
		addr[0] = CTX_READ(remote_ip6[0]);
		addr[1] = CTX_READ(remote_ip6[1]);
		addr[2] = CTX_READ(remote_ip6[2]);
		addr[3] = CTX_READ(remote_ip6[3]);
	}
	return trusted_addr(addr, cfg);
}

/* Records a TOA found in a packet of a connection from a trusted peer. */
static __always_inline void record(struct toa_peer *peer, const struct found *f, __u8 source)
{
	peer->state = ST_FOUND;
	peer->source = source;
	peer->family = f->family;
	peer->port = f->port;
	peer->addr[0] = f->addr[0];
	peer->addr[1] = f->addr[1];
	peer->addr[2] = f->addr[2];
	peer->addr[3] = f->addr[3];
	count(CNT_FOUND);
}

static __always_inline void remember_lb(const struct bpf_sock_ops *skops, struct toa_peer *peer)
{
	if (skops->family == AF_INET) {
		peer->lb_addr[0] = 0;
		peer->lb_addr[1] = 0;
		peer->lb_addr[2] = bpf_htonl(0xffff);
		peer->lb_addr[3] = CTX_READ(remote_ip4);
	} else {
		peer->lb_addr[0] = CTX_READ(remote_ip6[0]);
		peer->lb_addr[1] = CTX_READ(remote_ip6[1]);
		peer->lb_addr[2] = CTX_READ(remote_ip6[2]);
		peer->lb_addr[3] = CTX_READ(remote_ip6[3]);
	}
	/* remote_port holds the network-order port in its upper 16 bits on little endian */
	peer->lb_port = (__u16)(CTX_READ(remote_port) >> 16);
}

static __always_inline void watch(struct bpf_sock_ops *skops, int on)
{
	__u32 flags = skops->bpf_sock_ops_cb_flags;
	if (on)
		flags |= BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
	else
		flags &= ~BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
	bpf_sock_ops_cb_flags_set(skops, flags);
}

static __always_inline void established(struct bpf_sock_ops *skops, const struct toa_config *cfg)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	/* Connections from anyone but a trusted LB cost one trie lookup and a
	 * counter: no socket storage, no option parsing, no watching. */
	if (!trusted(skops, cfg)) {
		count(CNT_UNTRUSTED);
		return;
	}
	struct toa_peer *peer = bpf_sk_storage_get(&toa_peers, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!peer)
		return;
	remember_lb(skops, peer);

	__u8 opts[64] = {};
	struct found f = {};

	/* 1. The SYN, kept by TCP_SAVE_SYN. */
	__u8 syn[60] = {};
	int n = bpf_getsockopt(skops, SOL_TCP, TCP_BPF_SYN, syn, sizeof(syn));
	if (n >= 20) {
		int len = copy_options(syn, syn + sizeof(syn), opts);
		if (len >= 0) {
			find_toa(opts, len, cfg->kind_formats, &f);
			if (f.result == 1) {
				record(peer, &f, SRC_SYN);
				return;
			}
			if (f.result < 0)
				count(CNT_MALFORMED);
		}
	}

	/* 2. The ACK that completes the handshake (LVS, Huawei ELB). */
	__builtin_memset(opts, 0, sizeof(opts));
	__builtin_memset(syn, 0, sizeof(syn));
	int len = copy_options(skops->skb_data, skops->skb_data_end, opts);
	if (len >= 0) {
		find_toa(opts, len, cfg->kind_formats, &f);
		if (f.result == 1) {
			record(peer, &f, SRC_ACK);
			return;
		}
		if (f.result < 0)
			count(CNT_MALFORMED);
	}

	/* 3. Watch the next client segments (DPVS puts it in data too). */
	peer->state = ST_WATCH;
	watch(skops, 1);
}

static __always_inline void segment(struct bpf_sock_ops *skops, const struct toa_config *cfg)
{
	struct bpf_sock *sk = skops->sk;
	struct toa_peer *peer = sk ? bpf_sk_storage_get(&toa_peers, sk, 0, 0) : NULL;
	if (!peer || peer->state != ST_WATCH || peer->returned) {
		watch(skops, 0);
		return;
	}
	__u8 opts[64] = {};
	struct found f = {};
	int len = copy_options(skops->skb_data, skops->skb_data_end, opts);
	if (len >= 0) {
		find_toa(opts, len, cfg->kind_formats, &f);
		if (f.result == 1) {
			record(peer, &f, SRC_DATA);
			watch(skops, 0);
			return;
		}
		if (f.result < 0)
			count(CNT_MALFORMED);
	}
	if (++peer->segments >= MAX_DATA_SEGMENTS) {
		peer->state = ST_NONE;
		watch(skops, 0);
	}
}

SEC("sockops")
int toa_sockops(struct bpf_sock_ops *skops)
{
	/* Every socket of the cgroup comes through here, clients' too: return
	 * before any map lookup unless the event is one of ours. */
	__u32 op = skops->op;
	if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		int one = 1;
		bpf_setsockopt(skops, SOL_TCP, TCP_SAVE_SYN, &one, sizeof(one));
	} else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		__u32 zero = 0;
		const struct toa_config *cfg = bpf_map_lookup_elem(&toa_config, &zero);
		if (cfg)
			established(skops, cfg);
	}
	return 1;
}

/* The data segments after the handshake, in a program of its own: together
 * with the handshake's two searches one program would exceed the verifier's
 * budget of a million instructions. */
SEC("sockops")
int toa_sockops_data(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_PARSE_HDR_OPT_CB)
		return 1;
	__u32 zero = 0;
	const struct toa_config *cfg = bpf_map_lookup_elem(&toa_config, &zero);
	if (cfg)
		segment(skops, cfg);
	return 1;
}

/* The storage of the socket behind a getpeername()/accept() answer, marked as handed out. */
static __always_inline struct toa_peer *answered(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return NULL;
	struct toa_peer *peer = bpf_sk_storage_get(&toa_peers, sk, 0, 0);
	if (!peer)
		return NULL;
	peer->returned = 1;
	return peer->state == ST_FOUND ? peer : NULL;
}

SEC("cgroup/getpeername4")
int toa_getpeername4(struct bpf_sock_addr *ctx)
{
	struct toa_peer *peer = answered(ctx);
	if (!peer)
		return 1;
	if (peer->family != AF_INET) {
		/* no sockaddr_in can hold an IPv6 client: leave the real peer */
		count(CNT_V6_ON_V4);
		return 1;
	}
	ctx->user_ip4 = peer->addr[0];
	ctx->user_port = peer->port;
	count(CNT_REWRITTEN);
	return 1;
}

/* Shows a client (family, address as stored: IPv4 in addr[0]) to an IPv6
 * socket: an IPv4 one as ::ffff:a.b.c.d (a dual-stack socket). */
static __always_inline void show_client6(struct bpf_sock_addr *ctx, __u8 family, const __u32 *addr, __u16 port)
{
	if (family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = addr[0];
	} else {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	}
	ctx->user_port = port;
}

SEC("cgroup/getpeername6")
int toa_getpeername6(struct bpf_sock_addr *ctx)
{
	struct toa_peer *peer = answered(ctx);
	if (!peer)
		return 1;
	show_client6(ctx, peer->family, peer->addr, peer->port);
	count(CNT_REWRITTEN);
	return 1;
}

/* ---- UDP: UOA ---------------------------------------------------------- */

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17
/* Whatever the program lets through goes on to the next program on the hook
 * (TCX_NEXT; with a legacy clsact filter, on as if unclassified): returning
 * "ok" would end the chain, and other programs on the link (a CNI's) would
 * not run. */
#define TC_NEXT (-1)
#define TC_ACT_SHOT 2

/* The client as the way-back key holds it: IPv4 as ::ffff:a.b.c.d. */
static __always_inline void client_key(struct udp_rkey *rk, const struct uoa_client *c, __u16 local_port)
{
	if (c->family == AF_INET) {
		rk->client_addr[2] = bpf_htonl(0xffff);
		rk->client_addr[3] = c->addr[0];
	} else {
		__builtin_memcpy(rk->client_addr, c->addr, 16);
	}
	rk->client_port = c->port;
	rk->local_port = local_port;
}

/* A datagram from key->lb_addr carried the UOA search result *c. Returns 1
 * when a trusted UOA was recorded. */
static __always_inline int record_udp(const struct udp_key *key, const struct uoa_client *c)
{
	if (c->result < 0) {
		count(CNT_UDP_MALFORMED);
		return 0;
	}
	if (c->result == 0)
		return 0;
	__u32 zero = 0;
	const struct toa_config *cfg = bpf_map_lookup_elem(&toa_config, &zero);
	if (!cfg)
		return 0;
	if (!trusted_addr(key->lb_addr, cfg)) {
		count(CNT_UDP_UNTRUSTED);
		return 0;
	}
	struct udp_rkey rk = {};
	client_key(&rk, c, key->local_port);
	struct udp_lb lb = {.port = key->lb_port};
	__builtin_memcpy(lb.addr, key->lb_addr, 16);
	struct uoa_client value = *c;
	value.result = 0;
	bpf_map_update_elem(&toa_udp_flows, key, &value, BPF_ANY);
	bpf_map_update_elem(&toa_udp_replies, &rk, &lb, BPF_ANY);
	count(CNT_UDP_FOUND);
	return 1;
}

/* Removes the opp header (len bytes) after the fixed IP header and makes
 * the packet UDP again: protocol/next header, length, IPv4 checksum. The UDP
 * checksum covers neither, so it stays right, and the UDP header keeps its
 * place (the IP header moves), so does a CHECKSUM_PARTIAL's csum_start. */
static __always_inline void strip_opp(struct __sk_buff *skb, int len, int v4, const __u8 *ip)
{
	if (len <= 0 || len > OPP_MAX_LEN)
		return;
	if (bpf_skb_adjust_room(skb, -len, BPF_ADJ_ROOM_NET, 0) < 0) {
		count(CNT_UDP_MALFORMED);
		return;
	}
	__u8 udp = IPPROTO_UDP;
	if (v4) {
		__u16 old_len, old_ttl_proto, new_ttl_proto;
		__builtin_memcpy(&old_len, ip + 2, 2);
		__builtin_memcpy(&old_ttl_proto, ip + 8, 2);
		__u16 new_len = bpf_htons(bpf_ntohs(old_len) - len);
		__u8 ttl_proto[2] = {ip[8], IPPROTO_UDP};
		__builtin_memcpy(&new_ttl_proto, ttl_proto, 2);
		bpf_skb_store_bytes(skb, ETH_HLEN + 2, &new_len, 2, 0);
		bpf_skb_store_bytes(skb, ETH_HLEN + 9, &udp, 1, 0);
		bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_len, new_len, 2);
		bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_ttl_proto, new_ttl_proto, 2);
	} else {
		__u16 old_len;
		__builtin_memcpy(&old_len, ip + 4, 2);
		__u16 new_len = bpf_htons(bpf_ntohs(old_len) - len);
		bpf_skb_store_bytes(skb, ETH_HLEN + 4, &new_len, 2, 0);
		bpf_skb_store_bytes(skb, ETH_HLEN + 6, &udp, 1, 0);
	}
	count(CNT_UDP_STRIPPED);
}

/* Where a datagram's UOA can be: its options' offset and length, the opp
 * header's length (0 for ipo), and the UDP header's offset. */
struct uoa_place {
	__u32 opts_at;
	__u32 opts_len;
	__u32 opp;
	__u32 l4;
};

/* The length of the opp header at `at`, or -1 (malformed). */
static __always_inline int opp_at(struct __sk_buff *skb, __u32 at)
{
	__u8 hdr[OPP_HEADER_LEN];
	if (bpf_skb_load_bytes(skb, at, hdr, sizeof(hdr)) < 0)
		return -1;
	return opp_header_len(hdr);
}

/* Whether an IPv4 packet (its fixed header in ip) may carry a UOA: 1 with
 * *at filled, 0 when it cannot, -1 when malformed. */
static __always_inline int place4(struct __sk_buff *skb, const __u8 *ip, struct uoa_place *at)
{
	int ihl = (ip[0] & 0x0f) * 4;
	__u8 proto = ip[9];
	/* The common case, first: neither an opp header nor IP options. */
	if (proto != IPPROTO_UOA_OPP && (proto != IPPROTO_UDP || ihl <= 20))
		return 0;
	if ((ip[0] >> 4) != 4 || ihl < 20 || ((ip[6] & 0x3f) | ip[7]))
		return 0; /* not IPv4, or a fragment: passed as it is */
	if (proto == IPPROTO_UDP) {
		at->opts_at = ETH_HLEN + 20;
		at->opts_len = ihl - 20;
		at->l4 = ETH_HLEN + ihl;
		return 1;
	}
	if (ihl != 20)
		return -1; /* IP options and an opp header: not what an LB sends */
	int opp = opp_at(skb, ETH_HLEN + 20);
	if (opp < 0)
		return -1;
	at->opp = opp;
	at->opts_at = ETH_HLEN + 20 + OPP_HEADER_LEN;
	at->opts_len = opp - OPP_HEADER_LEN;
	at->l4 = ETH_HLEN + 20 + opp;
	return 1;
}

/* The same for IPv6 (no header options: only opp, after the fixed header). */
static __always_inline int place6(struct __sk_buff *skb, const __u8 *ip, struct uoa_place *at)
{
	if (ip[6] != IPPROTO_UOA_OPP || (ip[0] >> 4) != 6)
		return 0;
	int opp = opp_at(skb, ETH_HLEN + 40);
	if (opp < 0)
		return -1;
	at->opp = opp;
	at->opts_at = ETH_HLEN + 40 + OPP_HEADER_LEN;
	at->opts_len = opp - OPP_HEADER_LEN;
	at->l4 = ETH_HLEN + 40 + opp;
	return 1;
}

/* tc ingress of the backend's (Ethernet) interfaces. Never drops: whatever
 * it cannot read passes as it came (a malformed opp header, then, is
 * dropped by the IP stack, as without the helper). */
SEC("classifier")
int toa_udp_ingress(struct __sk_buff *skb)
{
	int v4 = skb->protocol == bpf_htons(ETH_P_IP);
	if (!v4 && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_NEXT;
	/* Every packet of the link comes here (TCP too): the ones that cannot
	 * carry a UOA leave after a look at the linear head, without a copy. */
	const __u8 *head = (const __u8 *)(long)skb->data + ETH_HLEN;
	if ((const void *)(head + 40) <= (const void *)(long)skb->data_end) {
		if (v4 && head[9] != IPPROTO_UOA_OPP && (head[9] != IPPROTO_UDP || (head[0] & 0x0f) <= 5))
			return TC_NEXT;
		if (!v4 && head[6] != IPPROTO_UOA_OPP)
			return TC_NEXT;
	}
	__u8 ip[40] = {};
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, v4 ? 20 : 40) < 0)
		return TC_NEXT;
	struct uoa_place at = {};
	int where = v4 ? place4(skb, ip, &at) : place6(skb, ip, &at);
	if (where <= 0) {
		if (where < 0)
			count(CNT_UDP_MALFORMED);
		return TC_NEXT;
	}
	struct udp_key key = {};
	if (v4) {
		key.lb_addr[2] = bpf_htonl(0xffff);
		__builtin_memcpy(&key.lb_addr[3], ip + 12, 4);
	} else {
		__builtin_memcpy(key.lb_addr, ip + 8, 16);
	}
	__u8 opts[64] = {};
	__u32 len = at.opts_len;
	if (len > 40 || (len > 0 && bpf_skb_load_bytes(skb, at.opts_at, opts, len) < 0))
		return TC_NEXT;
	struct uoa_client c;
	find_uoa_option(opts, len, &c);
	__u8 udp[6]; /* ports and length */
	if (bpf_skb_load_bytes(skb, at.l4, udp, sizeof(udp)) < 0)
		return TC_NEXT;
	__builtin_memcpy(&key.lb_port, udp, 2);
	__builtin_memcpy(&key.local_port, udp + 2, 2);
	if (record_udp(&key, &c) && udp[4] == 0 && udp[5] == 8) {
		/* An empty datagram sent only to carry the UOA (an LB's answer to a
		 * datagram with no room for it): recorded; the application never sees it. */
		count(CNT_UDP_CARRIER);
		return TC_ACT_SHOT;
	}
	if (at.opp)
		strip_opp(skb, at.opp, v4, ip);
	return TC_NEXT;
}

/* The flow a datagram from lb_addr:lb_port to the socket belongs to. */
static __always_inline const struct uoa_client *udp_flow(struct udp_key *key, struct bpf_sock *sk,
							 __u32 lb_port)
{
	key->lb_port = (__u16)lb_port;
	key->local_port = bpf_htons((__u16)sk->src_port);
	const struct uoa_client *c = bpf_map_lookup_elem(&toa_udp_flows, key);
	if (!c)
		return NULL;
	/* Keep the way back with the flow: the two LRU maps evict apart. */
	struct udp_rkey rk = {};
	client_key(&rk, c, key->local_port);
	if (!bpf_map_lookup_elem(&toa_udp_replies, &rk)) {
		struct udp_lb lb = {.port = key->lb_port};
		__builtin_memcpy(lb.addr, key->lb_addr, 16);
		bpf_map_update_elem(&toa_udp_replies, &rk, &lb, BPF_ANY);
	}
	return c;
}

SEC("cgroup/recvmsg4")
int toa_udp_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct udp_key key = {};
	key.lb_addr[2] = bpf_htonl(0xffff);
	key.lb_addr[3] = ctx->user_ip4;
	const struct uoa_client *c = udp_flow(&key, sk, ctx->user_port);
	if (!c)
		return 1;
	if (c->family != AF_INET) {
		count(CNT_V6_ON_V4);
		return 1;
	}
	ctx->user_ip4 = c->addr[0];
	ctx->user_port = c->port;
	count(CNT_UDP_RECV);
	return 1;
}

SEC("cgroup/recvmsg6")
int toa_udp_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct udp_key key = {};
	key.lb_addr[0] = ctx->user_ip6[0];
	key.lb_addr[1] = ctx->user_ip6[1];
	key.lb_addr[2] = ctx->user_ip6[2];
	key.lb_addr[3] = ctx->user_ip6[3];
	const struct uoa_client *c = udp_flow(&key, sk, ctx->user_port);
	if (!c)
		return 1;
	show_client6(ctx, c->family, c->addr, c->port);
	count(CNT_UDP_RECV);
	return 1;
}

/* The LB that speaks for the client at rk (filled but for the local port). */
static __always_inline const struct udp_lb *reply_via(struct udp_rkey *rk, struct bpf_sock *sk, __u32 port)
{
	rk->client_port = (__u16)port;
	rk->local_port = bpf_htons((__u16)sk->src_port);
	return bpf_map_lookup_elem(&toa_udp_replies, rk);
}

/* sendmsg4 and connect4: a client the socket was shown goes back to its LB. */
static __always_inline int to_lb4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk || ctx->type != 2 /* SOCK_DGRAM */)
		return 1;
	struct udp_rkey rk = {};
	rk.client_addr[2] = bpf_htonl(0xffff);
	rk.client_addr[3] = ctx->user_ip4;
	const struct udp_lb *lb = reply_via(&rk, sk, ctx->user_port);
	if (!lb || lb->addr[0] || lb->addr[1] || lb->addr[2] != bpf_htonl(0xffff))
		return 1; /* unknown, or an IPv6 LB an IPv4 socket cannot reach */
	ctx->user_ip4 = lb->addr[3];
	ctx->user_port = lb->port;
	count(CNT_UDP_SEND);
	return 1;
}

static __always_inline int to_lb6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk || ctx->type != 2 /* SOCK_DGRAM */)
		return 1;
	struct udp_rkey rk = {};
	rk.client_addr[0] = ctx->user_ip6[0];
	rk.client_addr[1] = ctx->user_ip6[1];
	rk.client_addr[2] = ctx->user_ip6[2];
	rk.client_addr[3] = ctx->user_ip6[3];
	const struct udp_lb *lb = reply_via(&rk, sk, ctx->user_port);
	if (!lb)
		return 1;
	ctx->user_ip6[0] = lb->addr[0];
	ctx->user_ip6[1] = lb->addr[1];
	ctx->user_ip6[2] = lb->addr[2];
	ctx->user_ip6[3] = lb->addr[3];
	ctx->user_port = lb->port;
	count(CNT_UDP_SEND);
	return 1;
}

SEC("cgroup/sendmsg4")
int toa_udp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return to_lb4(ctx);
}

SEC("cgroup/sendmsg6")
int toa_udp_sendmsg6(struct bpf_sock_addr *ctx)
{
	return to_lb6(ctx);
}

SEC("cgroup/connect4")
int toa_udp_connect4(struct bpf_sock_addr *ctx)
{
	return to_lb4(ctx);
}

SEC("cgroup/connect6")
int toa_udp_connect6(struct bpf_sock_addr *ctx)
{
	return to_lb6(ctx);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
