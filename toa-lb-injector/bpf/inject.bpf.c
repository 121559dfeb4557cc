// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * inject.bpf.c: the TOA injector of toa-lb, a pair of tc programs on the
 * interface that faces clients.
 *
 * toa_lb_ingress runs before netfilter, so the kernel's own NAT then carries
 * what it wrote to the backend unchanged. For each segment to a listener
 * (toa_lb_listeners: VIP, port, protocol):
 *   - every TOA-format option the client wrote is overwritten with NOPs (no
 *     size change, incremental checksum update), in every mode: a client may
 *     not speak for itself. An option that overruns the header ends it: an
 *     EOL is written over it, so that no reader looks further;
 *   - at a SYN in TOA mode the flow is recorded (toa_lb_tcp_flows), so
 *     that its handshake ACK and data follow the mode it started with,
 *     whatever a live switch does meanwhile; a client FIN or RST forgets it.
 *     The table is direct-mapped (a slot per hash of the flow's addresses,
 *     no lock, no allocation): a flow whose slot another takes loses its
 *     record, which only a flood makes likely, as an LRU would evict it.
 *     A slot is 16 bytes (a flow is known by a second, 32-bit hash of its
 *     addresses, not by the addresses), because several packets of every
 *     connection look it up: with the whole key in each slot the table was
 *     9 MB for max_flows = 100000. The loads of a slot are still where this
 *     program waits most (about a quarter of its samples in perf): the
 *     packets of a connection are handled on different CPUs, and its slot
 *     moves between their caches, as conntrack's entry does;
 *   - the client's address and port go into a TOA in the SYN, the
 *     handshake's pure ACK (seq = ISN + 1, ack = the backend's ISN + 1) and/or
 *     data segments until the backend first sends data, as the placement says
 *     (retransmissions too). The header grows at the tail, so that the TCP
 *     header stays where csum_start points on a CHECKSUM_PARTIAL skb (veth
 *     with tx offload): options and payload move up, the TOA goes right
 *     after the base header, and the checksum follows incrementally
 *     (bpf_l4_csum_replace leaves a PARTIAL skb's field alone for data, and
 *     updates it for the pseudo-header length). GSO batches never grow
 *     (counted no_room): only SYNs, pure ACKs and small data segments do;
 *   - a transparent listener's packets get transparent_mark ORed into
 *     skb->mark, and toa-lb's nftables rules then skip their SNAT. (Only a
 *     flow's first packet makes that decision, in conntrack.);
 *   - each TCP SYN and UDP datagram to a listener gets config.gate_mark:
 *     toa-lb's table balances a new flow only with it, so that nothing is
 *     balanced while these programs are not running;
 *   - a TCP segment to a listener that this program cannot read into (an
 *     IPv4 first fragment; IPv6 extension headers) is dropped and counted
 *     (unreadable): a client's TOA in it would reach the backend. The first
 *     fragment is enough: the rest cannot be reassembled without it. IPv6
 *     chains longer than MAX_EXT_HEADERS are dropped whatever they carry;
 *   - a new flow takes one from toa_lb_budget (max_flows minus the flows
 *     conntrack holds, written by toa-lb); with none left it is dropped.
 * toa_lb_egress sees the backend's SYN-ACK on its way back to the client:
 * it notes the backend's ISN and, for a flow whose listener clamps
 * (PLACE_CLAMP: data placement, or mss_clamp = "on"), lowers the MSS by the
 * option's size; the backend's first data ends data placement. A segment
 * that the option would push past the MTU of the interface toward the
 * backends (config.mtu_ifindex) goes without it (no_room):
 * with the TOA in the SYN and the handshake's pure ACK only, just a TCP Fast
 * Open SYN with data can come near that, so such flows need no clamp.
 * UDP listeners in UOA mode: see "UDP listeners in UOA mode" below
 * (toa_lb_backend_egress, on the interface that faces the backends).
 *
 * Built by scripts/build-bpf.sh (clang -target bpf); the object is committed.
 * The layouts below are mirrored in src/datapath/kernel/injector.rs: change
 * both together.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "options.h"

/* What the programs let through goes on to the next program on the hook
 * (TCX_NEXT; with a legacy clsact filter, on as if unclassified): returning
 * "ok" would end the chain, and the host's other tc programs would not run. */
#define TC_NEXT TC_ACT_UNSPEC

/* listener.mode, flow.mode */
#define MODE_OFF 0
#define MODE_TOA 1
#define MODE_TRANSPARENT 2
#define MODE_UOA 3 /* UDP: listener.kind4 is the format (UOA_*), listener.placement the datagrams */

/* flow.kind of a UOA flow */
#define UOA_OPP 0
#define UOA_IPO 1

/* listener.placement, flow.placement */
#define PLACE_SYN 1
#define PLACE_ACK 2
#define PLACE_DATA 4
#define PLACE_UOA 8 /* a UDP flow in UOA mode: flow.kind the format, flow.len the datagrams left */
#define PLACE_CLAMP 16 /* TCP: the backend's SYN-ACK MSS is lowered by the option's size */

/* Counters per listener slot (toa_lb_counters index: slot * NR_COUNTERS + counter). */
#define CNT_INJECTED 0    /* TOA options written */
#define CNT_NO_ROOM 1     /* segments that should have carried one and had no room */
#define CNT_STRIPPED 2    /* TOA-format options clients sent, overwritten */
#define CNT_MALFORMED 3   /* client segments whose options overran the header */
#define CNT_MSS_CLAMPED 4 /* SYN-ACKs whose MSS was lowered */
#define CNT_TABLE_FULL 5  /* new flows dropped: max_flows reached */
#define CNT_UOA_INJECTED 6 /* UOAs written into datagrams */
#define CNT_UOA_NO_ROOM 7  /* datagrams that should have carried one and had no room */
#define CNT_UOA_STRIPPED 8 /* UOAs clients sent, removed */
#define CNT_UOA_CARRIERS 9 /* empty datagrams sent only to carry a UOA */
#define CNT_UNREADABLE 10  /* TCP segments dropped: an IPv4 fragment, behind IPv6 extension headers,
			    * or options that could not be read or rewritten (a forged TOA would stay) */
#define NR_COUNTERS 11
#define MAX_LISTENERS 1024
/* The counters of packets that no listener can be told for: IPv6 packets
 * whose extension header chain is too long or cut short (CNT_UNREADABLE). */
#define HOST_SLOT MAX_LISTENERS

/* config.flags */
#define CFG_DATA_PLACEMENT 1 /* some listener places the TOA in data: egress watches data */

/* Payload bytes moved to make room in a data segment: 32 chunks of 64. */
#define MOVE_CHUNK 64
#define MOVE_CHUNKS 32

/* The most header bytes parsed in place: Ethernet, IPv6, TCP with options. */
#define HEADROOM (ETH_HLEN + 40 + 60)

struct listener_key {
	__u32 addr[4]; /* the VIP, network order; IPv4 in addr[0], the rest 0 */
	__u16 port;    /* network order */
	__u8 family;   /* 4 or 6 */
	__u8 proto;    /* IPPROTO_TCP or IPPROTO_UDP */
};

struct listener {
	__u32 slot;     /* counters index, < MAX_LISTENERS */
	__u8 mode;
	__u8 placement;
	__u8 kind4;     /* option kind for an IPv4 client (8 bytes: toa 254, tencent 200) */
	__u8 kind6;     /* for an IPv6 client (20 bytes: toa6 254, ali-v6 253) */
};

struct flow_key {
	__u32 client[4];
	__u32 vip[4];
	__u16 cport;
	__u16 vport;
	__u8 family;
	__u8 proto;
	__u8 pad[2];
};

/* A UDP flow while datagrams come (for max_flows, and UOA). */
struct flow {
	__u64 seen;     /* bpf_ktime_get_ns() of the last datagram */
	__u32 slot;     /* the listener's counters */
	__u8 placement; /* PLACE_UOA in UOA mode */
	__u8 kind;      /* UOA: the format (UOA_*) */
	__u8 len;       /* UOA: the datagrams left to mark */
	__u8 pad;
};

/* A TCP flow in TOA mode, from its SYN until the client's FIN or RST: one
 * slot of toa_lb_tcp_flows. The option's length follows from the client's
 * family (8 bytes for IPv4, 20 for IPv6). */
struct tcp_flow {
	__u32 tag;         /* tcp_tag() of the flow; 0: an empty slot */
	__u32 isn;         /* the client's initial sequence number */
	__u32 backend_isn; /* the backend's, from its SYN-ACK (0: not seen) */
	__u16 slot;        /* the listener's counters */
	__u8 placement;    /* PLACE_SYN | PLACE_ACK | PLACE_DATA | PLACE_CLAMP, and BACKEND_SPOKE */
	__u8 kind;         /* the option's kind */
};

/* tcp_flow.placement: the backend has sent data (data placement ends). */
#define BACKEND_SPOKE 0x80

/* One slot of the flow table. */
struct flow_slot {
	struct flow_key key; /* family 0: empty */
	struct flow flow;
};

struct config {
	__u32 transparent_mark; /* ORed into skb->mark for transparent listeners (0: never) */
	__u32 flags;            /* CFG_* */
	__u64 udp_timeout_ns;   /* a UDP flow idle this long is new again (conntrack's udp timeout) */
	__u32 flow_mask;        /* toa_lb_flows has flow_mask + 1 slots, a power of two */
	__u32 tcp_flow_mask;    /* toa_lb_tcp_flows has tcp_flow_mask + 1 slots, a power of two */
	__u8 kind_formats[256]; /* kind -> FMT_BIT()s of the formats stripped from clients */
	__u32 mtu_ifindex;      /* a grown TCP segment must fit this interface's MTU (0: the one it came in on) */
	__u32 gate_mark;        /* ORed into skb->mark of each TCP SYN and UDP datagram to a listener that
				 * went through here (0: never): toa-lb's table balances only those, so
				 * that no flow is balanced while the programs are not running (after a
				 * crash) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTENERS);
	__type(key, struct listener_key);
	__type(value, struct listener);
} toa_lb_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536); /* the loader sets it, with config.flow_mask */
	__type(key, __u32);
	__type(value, struct flow_slot);
} toa_lb_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536); /* the loader sets it, with config.tcp_flow_mask */
	__type(key, __u32);
	__type(value, struct tcp_flow);
} toa_lb_tcp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, (MAX_LISTENERS + 1) * NR_COUNTERS); /* the listeners' slots, then HOST_SLOT */
	__type(key, __u32);
	__type(value, __u64);
} toa_lb_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} toa_lb_config SEC(".maps");

/*
 * New flows still allowed before max_flows: toa-lb writes it a few times a
 * second from the connection tracker's count, and each new flow (a SYN; a
 * UDP datagram with no live flow) takes one. At zero new flows are dropped
 * and counted: the bound holds between toa-lb's looks.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} toa_lb_budget SEC(".maps");

/* Buffers for one packet's options: the BPF stack (512 bytes) cannot hold them all. */
struct scratch {
	__u8 old[OPT_BUF];  /* the options as they arrived */
	__u8 opts[OPT_BUF]; /* as they are on the wire now (stripped) */
	__u8 area[OPT_BUF]; /* the new area, TOA first */
	__u8 toa[OPT_BUF];  /* the option written */
	__u8 chunk[MOVE_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} toa_lb_scratch SEC(".maps");

static __always_inline void count_n(__u32 slot, __u32 counter, __u64 n)
{
	if (slot > HOST_SLOT)
		return;
	__u32 index = slot * NR_COUNTERS + counter;
	__u64 *value = bpf_map_lookup_elem(&toa_lb_counters, &index);
	if (value)
		*value += n;
}

static __always_inline void count(__u32 slot, __u32 counter)
{
	count_n(slot, counter, 1);
}

/* Takes one new flow from the budget; 0 when there is none left. */
static __always_inline int admit(__u32 slot)
{
	__u32 zero = 0;
	__s64 *budget = bpf_map_lookup_elem(&toa_lb_budget, &zero);
	if (!budget)
		return 1;
	if (*budget <= 0) {
		count(slot, CNT_TABLE_FULL);
		return 0;
	}
	__sync_fetch_and_add(budget, -1);
	return 1;
}

/* The scratch buffers, with the first OPT_MAX bytes of the option buffers
 * zeroed: the sums run over OPT_MAX bytes, and the padding must add nothing.
 * (toa is written whole before it is read.) */
static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&toa_lb_scratch, &zero);
	if (s) {
		__builtin_memset(s->old, 0, OPT_MAX);
		__builtin_memset(s->opts, 0, OPT_MAX);
		__builtin_memset(s->area, 0, OPT_MAX);
	}
	return s;
}

/*
 * The loops over options live in global functions: the verifier checks each
 * once, on its own, rather than at every call site in every caller state
 * (together they would exceed its budget of a million instructions).
 */

/* scan_options() over s->opts; returns stripped | malformed << 8. */
__noinline int strip_options(struct scratch *s, int len, const struct config *cfg)
{
	struct scan sc;
	if (!s || !cfg)
		return 0;
	scan_options(s->opts, len, cfg->kind_formats, &sc);
	return (sc.stripped & 0xff) | (sc.malformed << 8);
}

/* build_with_toa() from s->opts and s->toa into s->area. */
__noinline int build_area(struct scratch *s, int optlen, int toa_len)
{
	if (!s)
		return -1;
	return build_with_toa(s->opts, optlen, s->toa, toa_len, s->area);
}

/* Lowers the MSS in s->opts by `by`; 1 if it changed. */
__noinline int clamp_area(struct scratch *s, int len, int by)
{
	if (!s)
		return 0;
	int at = find_mss(s->opts, len);
	return at >= 0 && clamp_mss(s->opts, at, by);
}

/* Where a packet's headers are, and what the programs read of them. */
struct pkt {
	__u32 l3;      /* offset of the IP header */
	__u32 l4;      /* offset of the TCP or UDP header */
	__u32 end;     /* offset of the end of the IP packet */
	__u32 hlen;    /* TCP header length */
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;   /* network order */
	__u16 dport;
	__u32 seq;     /* host order */
	__u32 ack_seq;
	__u8 flags;    /* TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u8 family;
	__u8 proto;
	__u8 fast;     /* options in a layout with nothing to strip (see options_clean) */
};

/* IPv4 frag_off (host order): more fragments; the fragment offset. */
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_ACK 0x10

/*
 * Whether the options are in one of the layouts Linux sends, which hold no
 * TOA: none; NOP NOP timestamp; or a SYN's MSS, SACK-permitted, timestamp,
 * NOP, window scale. Most segments take this path and skip the walk.
 */
static __always_inline int options_clean(const __u8 *o, const void *data_end, __u32 optlen)
{
	if (optlen == 0)
		return 1;
	if (optlen == 12) {
		if ((const void *)(o + 12) > data_end)
			return 0;
		return o[0] == OPT_NOP && o[1] == OPT_NOP && o[2] == 8 && o[3] == 10;
	}
	if (optlen == 20) {
		if ((const void *)(o + 20) > data_end)
			return 0;
		return o[0] == OPT_MSS && o[1] == 4 && o[4] == 4 && o[5] == 2 && o[6] == 8 && o[7] == 10 &&
		       o[16] == OPT_NOP && o[17] == 3 && o[18] == 3;
	}
	return 0;
}

/* parse_linear(): the headers are not all in the linear part. */
#define NOT_LINEAR (-3)
/* parse(): the transport header may be behind something the parse does not
 * read (an IPv4 first fragment, IPv6 extension headers): p holds the family,
 * the addresses, the IP protocol (IPv6: the first next header) and p->l4 the
 * offset after the fixed IP header (IPv4: after its options). unhide() looks
 * further. */
#define HIDDEN (-4)

/* Ethernet, then IPv4 (not a fragment) or IPv6 (no extension header), then
 * TCP or UDP, read in place from the linear part. Returns -1 for anything
 * else (not the injector's), -2 for a malformed TCP header, NOT_LINEAR when
 * a header ends past the linear part, HIDDEN for the first fragment of an
 * IPv4 TCP segment or UDP datagram and for IPv6 with another next header. */
static __always_inline int parse_linear(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return NOT_LINEAR;
	p->l3 = ETH_HLEN;
	__u8 *l4;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return NOT_LINEAR;
		/* A later fragment: no ports to read, and nothing to reassemble
		 * without the first, which comes here as HIDDEN. */
		if (ip->version != 4 || ip->ihl < 5 || (ip->frag_off & bpf_htons(IP_OFFSET)))
			return -1;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return -1;
		p->family = 4;
		p->proto = ip->protocol;
		p->l4 = p->l3 + ip->ihl * 4;
		p->end = p->l3 + bpf_ntohs(ip->tot_len);
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->saddr[1] = p->saddr[2] = p->saddr[3] = 0;
		p->daddr[1] = p->daddr[2] = p->daddr[3] = 0;
		l4 = (__u8 *)ip + ip->ihl * 4;
		if (ip->frag_off & bpf_htons(IP_MF))
			return HIDDEN;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return NOT_LINEAR;
		p->family = 6;
		p->proto = ip6->nexthdr;
		p->l4 = p->l3 + sizeof(*ip6);
		p->end = p->l4 + bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return HIDDEN;
		l4 = (__u8 *)(ip6 + 1);
	} else {
		return -1;
	}
	if (p->end > skb->len || p->l4 + 8 > p->end)
		return -1;
	if (p->proto != IPPROTO_TCP) {
		__u16 *ports = (void *)l4;
		if ((void *)(ports + 2) > data_end)
			return NOT_LINEAR;
		p->sport = ports[0];
		p->dport = ports[1];
		return 0;
	}
	struct tcphdr *th = (void *)l4;
	if ((void *)(th + 1) > data_end)
		return NOT_LINEAR;
	p->sport = th->source;
	p->dport = th->dest;
	p->hlen = th->doff * 4;
	p->seq = bpf_ntohl(th->seq);
	p->ack_seq = bpf_ntohl(th->ack_seq);
	p->flags = ((__u8 *)th)[13];
	if (p->hlen < 20 || p->l4 + p->hlen > p->end)
		return -2; /* malformed: counted by the caller */
	p->fast = options_clean((__u8 *)(th + 1), data_end, p->hlen - 20);
	return 0;
}

/* The TCP flags byte of an IPv4 or IPv6 TCP segment whose headers are in
 * the linear part, or -1 for anything else (parse() then looks closer). A
 * fragment or a bad header length may give a wrong byte: parse() refuses
 * those anyway. */
static __always_inline int peek_tcp_flags(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 *th;
	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
			return -1;
		th = (__u8 *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		th = (__u8 *)(ip6 + 1);
	} else {
		return -1;
	}
	if ((void *)(th + 14) > data_end)
		return -1;
	return th[13];
}

/* parse_linear(), after pulling the headers into the linear part if they
 * are not there (rare: a TCP stack or a NIC puts the headers of a packet in
 * its linear part and the payload in pages, so a pull of a fixed size would
 * copy payload, and often reallocate the head, on every data segment). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	/* A loop, not two calls: parse_linear() is inlined once per caller. */
#pragma nounroll
	for (int pulled = 0; pulled < 2; pulled++) {
		int r = parse_linear(skb, p);
		if (r != NOT_LINEAR)
			return r;
		if (pulled || skb->len <= skb->data_end - skb->data)
			return -1; /* truncated */
		bpf_skb_pull_data(skb, skb->len < HEADROOM ? skb->len : HEADROOM);
	}
	return -1;
}

/* The IPv6 extension headers unhide() walks: more than that, and the packet
 * is dropped (where it goes is unknown; the kernel would walk on). */
#define MAX_EXT_HEADERS 8
/* unhide(): the transport header could not be read. */
#define OPAQUE (-5)
/* unhide(): the ports were found, behind an IPv4 first fragment's header or
 * IPv6 extension headers. */
#define UNREADABLE 1

/* After parse() said HIDDEN: finds the TCP or UDP ports behind an IPv4 first
 * fragment's header, or at the end of an IPv6 extension-header chain (as the
 * kernel's ipv6_skip_exthdr() finds them, so as its conntrack will).
 * Returns UNREADABLE with p->proto, p->l4 and the ports set: such a TCP
 * segment's options may be split between fragments, or lie behind headers
 * where this program does not write, so it can neither strip nor insert a
 * TOA there. Returns -1 for anything that is not TCP or UDP (or a later
 * IPv6 fragment), and OPAQUE when the chain is too long or cut short. */
static __always_inline int unhide(struct __sk_buff *skb, struct pkt *p)
{
	__u8 next = p->proto;
	__u32 off = p->l4;
	/* IPv6 payload length 0 behind a hop-by-hop header: a jumbogram. On the
	 * wire (an MTU below 64 KiB) the kernel's own check drops it before
	 * netfilter; otherwise it is a BIG TCP GRO batch, which older kernels
	 * build with such a header: passed, as before. */
	if (p->family == 6 && next == IPPROTO_HOPOPTS && p->end == p->l4)
		return -1;
	if (p->family == 6) {
#pragma unroll
		for (int i = 0; i < MAX_EXT_HEADERS; i++) {
			if (next == IPPROTO_TCP || next == IPPROTO_UDP)
				break;
			__u8 h[4];
			int ext = next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
				  next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
			if (!ext)
				return -1;
			if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
				return OPAQUE;
			if (next == IPPROTO_FRAGMENT) {
				/* A later fragment: as for IPv4 (parse_linear). */
				if (((h[2] << 8) | h[3]) & 0xfff8)
					return -1;
				off += 8;
			} else if (next == IPPROTO_AH) {
				off += ((__u32)h[1] + 2) * 4;
			} else {
				off += ((__u32)h[1] + 1) * 8;
			}
			next = h[0];
		}
		if (next != IPPROTO_TCP && next != IPPROTO_UDP)
			return OPAQUE;
	} /* IPv4: parse_linear() said HIDDEN only for TCP and UDP */
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
		return OPAQUE;
	p->proto = next;
	p->l4 = off;
	p->sport = ports[0];
	p->dport = ports[1];
	return UNREADABLE;
}

static __always_inline const struct listener *listener_of(const struct pkt *p, const __u32 *addr, __u16 port)
{
	struct listener_key key = {.port = port, .family = p->family, .proto = p->proto};
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&toa_lb_listeners, &key);
}

/* The key of the UDP flow of a datagram from a client. */
static __always_inline void flow_key_of(struct flow_key *key, const struct pkt *p)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->client, p->saddr, 16);
	__builtin_memcpy(key->vip, p->daddr, 16);
	key->cport = p->sport;
	key->vport = p->dport;
	key->family = p->family;
	key->proto = p->proto;
}

/* The index of a flow's slot: a hash of its key's ten words. */
static __always_inline __u32 flow_index(const struct flow_key *key, const struct config *cfg)
{
	const __u32 *w = (const __u32 *)key;
	__u32 h = 0x9e3779b9;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*key) / 4); i++) {
		h ^= w[i];
		h *= 0x85ebca6b;
		h ^= h >> 15;
	}
	return h & cfg->flow_mask;
}

/* The slot of a flow. */
static __always_inline struct flow_slot *flow_slot(const struct flow_key *key, const struct config *cfg)
{
	__u32 index = flow_index(key, cfg);
	return bpf_map_lookup_elem(&toa_lb_flows, &index);
}

static __always_inline int same_key(const struct flow_key *a, const struct flow_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	__u32 diff = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*a) / 4); i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* The record of the flow `key`, or NULL. */
static __always_inline struct flow *flow_find(const struct flow_key *key, const struct config *cfg)
{
	struct flow_slot *slot = flow_slot(key, cfg);
	return slot && same_key(&slot->key, key) ? &slot->flow : 0;
}

/* Records the flow `key` (over whatever its slot held). */
static __always_inline void flow_put(const struct flow_key *key, const struct flow *flow, const struct config *cfg)
{
	struct flow_slot *slot = flow_slot(key, cfg);
	if (slot) {
		slot->key = *key;
		slot->flow = *flow;
	}
}

#define MIX64 0x9e3779b97f4a7c15ULL

/* A 64-bit hash of a TCP flow's addresses and ports (the client's side
 * first, whichever way the packet goes): its low bits pick the flow's slot
 * in toa_lb_tcp_flows, its high 32 bits are the flow's tag (tcp_tag). */
static __always_inline __u64 tcp_flow_hash(const struct pkt *p, int from_client)
{
	const __u32 *client = from_client ? p->saddr : p->daddr;
	const __u32 *vip = from_client ? p->daddr : p->saddr;
	__u32 ports = from_client ? ((__u32)p->sport << 16) | p->dport : ((__u32)p->dport << 16) | p->sport;
	__u64 h = MIX64 ^ p->family;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		h = (h ^ client[i]) * MIX64;
		h ^= h >> 29;
		h = (h ^ vip[i]) * MIX64;
		h ^= h >> 29;
	}
	h = (h ^ ports) * MIX64;
	h ^= h >> 32;
	h *= 0xbf58476d1ce4e5b9ULL;
	return h ^ (h >> 31);
}

/* A flow's tag: never 0, which marks an empty slot. Two flows in one slot
 * with one tag (a chance in 2^31) would share a record; the option written
 * always names the packet's own source, so at worst a segment would get an
 * option it should not have, or miss one. */
static __always_inline __u32 tcp_tag(__u64 hash)
{
	return (__u32)(hash >> 32) | 1;
}

/* The slot of the TCP flow with this hash (whichever flow holds it). */
static __always_inline struct tcp_flow *tcp_flow_slot(__u64 hash, const struct config *cfg)
{
	__u32 index = (__u32)hash & cfg->tcp_flow_mask;
	return bpf_map_lookup_elem(&toa_lb_tcp_flows, &index);
}

/* The record of the TCP flow with this hash, or NULL. */
static __always_inline struct tcp_flow *tcp_flow_find(__u64 hash, const struct config *cfg)
{
	struct tcp_flow *f = tcp_flow_slot(hash, cfg);
	return f && f->tag == tcp_tag(hash) ? f : 0;
}

/* A size for a helper, 1..64, whatever the verifier knows of `n` (callers
 * check the real bound first): clang may check one copy of a value and pass
 * another, which the verifier then sees as unbounded. */
#define SIZE64(n) ((((__u32)(n) - 1) & 63) + 1)

static __always_inline int load_options(struct __sk_buff *skb, __u32 at, __u8 *buf, int len)
{
	if (len < 1 || len > OPT_MAX)
		return -1;
	return bpf_skb_load_bytes(skb, at, buf, SIZE64(len));
}

/* The one's-complement sum of what changes when the 16-bit words of old
 * become those of new (OPT_MAX bytes each, zero padded), folded to 32 bits:
 * the `to` of bpf_l4_csum_replace() with no size. Summed here rather than
 * with bpf_csum_diff(): a helper call costs more than these adds. Native
 * loads, as the kernel's own checksum code uses. */
static __always_inline __u32 options_diff(const __u8 *old, const __u8 *new)
{
	__u64 acc = 0;
#pragma unroll
	for (int i = 0; i < OPT_MAX; i += 2) {
		acc += *(const __u16 *)&new[i];
		acc += (__u16)~*(const __u16 *)&old[i];
	}
	acc = (acc & 0xffffffff) + (acc >> 32);
	acc = (acc & 0xffffffff) + (acc >> 32);
	return (__u32)acc;
}

/* Writes the options area opts[0..len) at `at` over what was old[0..len),
 * and moves the TCP checksum by the difference (a PARTIAL skb's is left
 * alone: the device sums the data). Both buffers are zero padded. */
static __always_inline int rewrite_options(struct __sk_buff *skb, __u32 at, __u32 csum_at, const __u8 *old,
					   const __u8 *opts, int len)
{
	if (len < 1 || len > OPT_MAX || bpf_skb_store_bytes(skb, at, opts, SIZE64(len), 0) < 0)
		return -1;
	return bpf_l4_csum_replace(skb, csum_at, 0, options_diff(old, opts), 0);
}

/* Moves the payload [from, from + len) up by `by` bytes (the tail has
 * grown), from its end down, in chunks. */
__noinline int move_payload(struct __sk_buff *skb, struct scratch *s, __u32 from, __u32 len, __u32 by)
{
	if (!s || len > MOVE_CHUNK * MOVE_CHUNKS)
		return -1;
	for (int c = 0; c < MOVE_CHUNKS; c++) {
		__u32 done = c * MOVE_CHUNK;
		if (done >= len)
			break;
		__u32 n = len - done;
		if (n > MOVE_CHUNK)
			n = MOVE_CHUNK;
		__u32 at = from + len - done - n;
		if (bpf_skb_load_bytes(skb, at, s->chunk, SIZE64(n)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, at + by, s->chunk, SIZE64(n), 0) < 0)
			return -1;
	}
	return 0;
}

/*
 * Writes the client's TOA into the TCP header at p->l4, whose options are
 * s->opts[0..optlen) (stripped already), growing the header when it must.
 * Returns 0, or -1 when there is no room.
 */
static __always_inline int insert_toa(struct __sk_buff *skb, const struct pkt *p, struct scratch *s, __u8 kind,
				      __u32 mtu_ifindex)
{
	int optlen = p->hlen - 20;
	__u32 payload = p->end - p->l4 - p->hlen;
	int toa_len = p->family == 4 ? 8 : 20;

	/* Zero padded to the 20 bytes build_with_toa() copies. */
	__builtin_memset(s->toa, 0, 20);
	s->toa[0] = kind;
	s->toa[1] = toa_len;
	__builtin_memcpy(&s->toa[2], &p->sport, 2);
	if (toa_len == 8)
		__builtin_memcpy(&s->toa[4], &p->saddr[0], 4);
	else
		__builtin_memcpy(&s->toa[4], p->saddr, 16);
	int len = build_area(s, optlen, toa_len);
	if (len < 0 || len > OPT_MAX)
		return -1;
	/* Compaction may free bytes: pad with EOL rather than shrink. */
	for (int k = 0; k < OPT_MAX && len < optlen; k++)
		s->area[len++ & OPT_MASK] = OPT_EOL;
	__u32 grow = len - optlen;
	if (grow && (skb->gso_size || payload > MOVE_CHUNK * MOVE_CHUNKS))
		return -1;
	/* Past the MTU the kernel would drop it on the way to the backend. The
	 * IP length goes in (what the helper adds the device's link header to),
	 * not skb->len, which holds this link's header and any padding. */
	__u32 mtu = p->end - p->l3;
	if (grow && bpf_check_mtu(skb, mtu_ifindex, &mtu, (__s32)grow, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return -1;

	__u32 csum_at = p->l4 + offsetof(struct tcphdr, check);
	if (!grow)
		return rewrite_options(skb, p->l4 + 20, csum_at, s->opts, s->area, len);

	/* Five helper calls: grow the tail, then write the header from its data
	 * offset on, and the IP length, in one store each, and move the
	 * checksum for the data and for the pseudo header's TCP length. */
	__u32 tcp_len = p->end - p->l4;
	if (bpf_skb_change_tail(skb, p->end + grow, 0) < 0)
		return -1;
	if (payload && move_payload(skb, s, p->l4 + p->hlen, payload, grow) < 0)
		return -1;
	/* The skb is linear now: read the words before the options in place. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *th = data + p->l4;
	if ((void *)(th + 20) > data_end)
		return -1;
	/* TCP bytes 12..20 (data offset and flags, window, checksum, urgent
	 * pointer), then the new options: written at once from s->toa. */
	__u16 old_word = *(__u16 *)(th + 12);
	__builtin_memcpy(s->toa, th + 12, 8);
	__u16 new_word = (old_word & bpf_htons(0x0fff)) | bpf_htons(((__u32)(20 + len) >> 2) << 12);
	*(__u16 *)s->toa = new_word;
	__builtin_memcpy(&s->toa[8], s->area, OPT_MAX);
	if (p->family == 4) {
		struct iphdr *ip = data + p->l3;
		if ((void *)(ip + 1) > data_end)
			return -1;
		/* tot_len and the header checksum (RFC 1624), stored with their neighbours. */
		struct iphdr copy = *ip;
		__u16 old_tot = copy.tot_len, new_tot = bpf_htons(bpf_ntohs(old_tot) + grow);
		__u32 sum = (__u16)~copy.check + (__u16)~old_tot + new_tot;
		sum = (sum & 0xffff) + (sum >> 16);
		sum = (sum & 0xffff) + (sum >> 16);
		copy.tot_len = new_tot;
		copy.check = ~sum;
		if (bpf_skb_store_bytes(skb, p->l3, &copy, sizeof(copy), 0) < 0)
			return -1;
	} else {
		__u16 new_payload = bpf_htons(tcp_len + grow);
		if (bpf_skb_store_bytes(skb, p->l3 + offsetof(struct ipv6hdr, payload_len), &new_payload, 2, 0) < 0)
			return -1;
	}
	if (bpf_skb_store_bytes(skb, p->l4 + 12, s->toa, SIZE64(8 + len), 0) < 0)
		return -1;
	/* The data: the options, and the data offset word. */
	__u32 diff = options_diff(s->opts, s->area);
	__u64 acc = (__u64)diff + new_word + (__u16)~old_word;
	acc = (acc & 0xffffffff) + (acc >> 32);
	if (bpf_l4_csum_replace(skb, csum_at, 0, (__u32)acc, 0) < 0)
		return -1;
	/* The TCP length is in the pseudo header. */
	return bpf_l4_csum_replace(skb, csum_at, bpf_htons(tcp_len), bpf_htons(tcp_len + grow), BPF_F_PSEUDO_HDR | 2);
}

static __always_inline int tcp_ingress(struct __sk_buff *skb, struct pkt *p, const struct listener *l,
				       const struct config *cfg)
{
	int optlen = p->hlen - 20;
	int syn = (p->flags & (F_SYN | F_ACK)) == F_SYN;
	struct scratch *s = 0;

	if (!p->fast) {
		/* Fail closed: a segment whose options cannot be read, or whose
		 * forged TOA cannot be overwritten, goes no further. */
		s = scratch();
		if (!s || load_options(skb, p->l4 + 20, s->old, optlen) < 0) {
			count(l->slot, CNT_UNREADABLE);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(s->opts, s->old, OPT_BUF);
		int scanned = strip_options(s, optlen, cfg);
		if (scanned) {
			if (rewrite_options(skb, p->l4 + 20, p->l4 + offsetof(struct tcphdr, check), s->old, s->opts,
					    optlen) < 0) {
				count(l->slot, CNT_UNREADABLE);
				return TC_ACT_SHOT;
			}
			if (scanned & 0xff)
				count_n(l->slot, CNT_STRIPPED, scanned & 0xff);
			if (scanned >> 8)
				count(l->slot, CNT_MALFORMED);
		}
	}
	struct tcp_flow cur = {};
	struct tcp_flow *f;
	__u32 payload = p->end - p->l4 - p->hlen;
	int want = 0;
	if (syn) {
		/* Stripped (above), and about to get its TOA: the table may balance it. */
		skb->mark |= cfg->gate_mark;
		if (l->mode != MODE_TOA) {
			/* No record of the flow: every SYN counts (a retransmission too). */
			if (!admit(l->slot))
				return TC_ACT_SHOT;
			if (l->mode == MODE_TRANSPARENT && cfg->transparent_mark)
				skb->mark |= cfg->transparent_mark;
			return TC_NEXT;
		}
		__u64 hash = tcp_flow_hash(p, 1);
		f = tcp_flow_slot(hash, cfg);
		if (f && f->tag == tcp_tag(hash) && f->isn == p->seq) {
			cur = *f; /* a retransmission: the flow keeps what its first SYN had */
		} else { /* a new connection (perhaps from a port used before) */
			if (!admit(l->slot))
				return TC_ACT_SHOT;
			cur.tag = tcp_tag(hash);
			cur.isn = p->seq;
			cur.slot = l->slot;
			cur.placement = l->placement & (PLACE_SYN | PLACE_ACK | PLACE_DATA | PLACE_CLAMP);
			cur.kind = p->family == 4 ? l->kind4 : l->kind6;
			if (f)
				*f = cur;
		}
		want = cur.placement & PLACE_SYN;
	} else {
		/* A flow in TOA mode may want this segment: look it up. */
		int candidate = payload ? (l->placement & PLACE_DATA) && (p->flags & F_ACK)
					: (l->placement & PLACE_ACK) && (p->flags & (F_ACK | F_FIN | F_RST)) == F_ACK;
		if (!candidate && !(p->flags & (F_FIN | F_RST)))
			return TC_NEXT;
		f = tcp_flow_find(tcp_flow_hash(p, 1), cfg);
		if (!f)
			return TC_NEXT;
		if (p->flags & (F_FIN | F_RST)) {
			f->tag = 0;
			return TC_NEXT;
		}
		cur = *f;
		if (payload)
			want = (cur.placement & PLACE_DATA) && !(cur.placement & BACKEND_SPOKE);
		else
			want = (cur.placement & PLACE_ACK) && p->seq == cur.isn + 1 &&
			       (!cur.backend_isn || p->ack_seq == cur.backend_isn + 1);
	}
	if (!want)
		return TC_NEXT;
	if (!s) {
		s = scratch();
		if (!s)
			return TC_NEXT;
		if (optlen > 0 && load_options(skb, p->l4 + 20, s->opts, optlen) < 0)
			return TC_NEXT;
	}
	if (insert_toa(skb, p, s, cur.kind, cfg->mtu_ifindex) < 0)
		count(cur.slot, CNT_NO_ROOM);
	else
		count(cur.slot, CNT_INJECTED);
	return TC_NEXT;
}

/* ---- UDP listeners in UOA mode ----------------------------------------
 *
 * Ingress (before netfilter) strips a UOA a client wrote (its IPv4 options
 * go, or its opp header), and marks the first `datagrams` datagrams of each
 * flow for a UOA: UOA_MARK | the flow's slot in toa_lb_flows. The UOA itself
 * is written at egress of the backend-facing interface, after the kernel's
 * NAT: an opp header (protocol 248) would not match the flow's conntrack
 * entry before it. The mark does not leave the host (veth and the stack
 * scrub it between namespaces; egress clears it).
 */

/* The flow slot index in the mark: toa_lb_flows has at most 2^22 slots. */
#define UOA_MARK 0x40000000
#define UOA_INDEX_MASK 0x003fffff

#ifndef AF_INET
#define AF_INET 2
#define AF_INET6 10
#endif
#include "../../toa-server-shim/bpf/find_uoa.h"

/* Whether the IPv4 options (ihl > 5) of the packet at l3 hold a UOA
 * (malformed ones count as one: they go too). */
static __always_inline int client_ipo(struct __sk_buff *skb, __u32 l3, __u32 optlen)
{
	__u8 opts[64] = {};
	if (optlen < 1 || optlen > 40 || bpf_skb_load_bytes(skb, l3 + 20, opts, SIZE64(optlen)) < 0)
		return 0;
	struct uoa_client c;
	find_uoa_option(opts, optlen, &c);
	return c.result != 0;
}

/* Recomputes the IPv4 header checksum of the header (hlen bytes) at l3. */
static __always_inline void ipv4_checksum(struct __sk_buff *skb, __u32 l3, __u32 hlen)
{
	__u8 hdr[60] = {};
	__u16 zero = 0;
	if (hlen < 20 || hlen > 60 || bpf_skb_store_bytes(skb, l3 + 10, &zero, 2, 0) < 0)
		return;
	if (bpf_skb_load_bytes(skb, l3, hdr, SIZE64(hlen)) < 0)
		return;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 60; i += 2)
		if (i < (int)hlen)
			sum += *(const __u16 *)&hdr[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	__u16 csum = ~sum & 0xffff;
	bpf_skb_store_bytes(skb, l3 + 10, &csum, 2, 0);
}

/* Removes `len` bytes after the fixed IP header at l3 (a client's IPv4
 * options, or its opp header) and sets the IPv4 header length, protocol and
 * total length, or the IPv6 next header and payload length, to a plain UDP
 * packet's. The UDP checksum covers none of it. */
static __always_inline int remove_after_ip(struct __sk_buff *skb, __u32 l3, int v4, __u32 len)
{
	if (len < 1 || len > OPP_MAX_LEN || bpf_skb_adjust_room(skb, -(__s32)len, BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	__u8 udp = IPPROTO_UDP;
	if (v4) {
		__u8 vihl = 0x45;
		__u16 tot;
		if (bpf_skb_load_bytes(skb, l3 + 2, &tot, 2) < 0)
			return -1;
		tot = bpf_htons(bpf_ntohs(tot) - len);
		bpf_skb_store_bytes(skb, l3, &vihl, 1, 0);
		bpf_skb_store_bytes(skb, l3 + 2, &tot, 2, 0);
		bpf_skb_store_bytes(skb, l3 + 9, &udp, 1, 0);
		ipv4_checksum(skb, l3, 20);
	} else {
		__u16 plen;
		if (bpf_skb_load_bytes(skb, l3 + 4, &plen, 2) < 0)
			return -1;
		plen = bpf_htons(bpf_ntohs(plen) - len);
		bpf_skb_store_bytes(skb, l3 + 4, &plen, 2, 0);
		bpf_skb_store_bytes(skb, l3 + 6, &udp, 1, 0);
	}
	return 0;
}

/* A client's own opp datagram (IP protocol 248, which conntrack would not
 * match with the flow) to a UDP listener: its header goes before anything
 * else looks at it. Returns 1 when it was stripped. */
static __always_inline int strip_client_opp(struct __sk_buff *skb)
{
	__u8 ip[40] = {};
	int v4 = skb->protocol == bpf_htons(ETH_P_IP);
	if (!v4 && skb->protocol != bpf_htons(ETH_P_IPV6))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, v4 ? 20 : 40) < 0)
		return 0;
	__u32 hlen = v4 ? 20 : 40;
	if (v4 ? (ip[0] != 0x45 || ip[9] != IPPROTO_UOA_OPP || ((ip[6] & 0x3f) | ip[7]))
	       : ((ip[0] >> 4) != 6 || ip[6] != IPPROTO_UOA_OPP))
		return 0;
	__u8 hdr[OPP_HEADER_LEN];
	if (bpf_skb_load_bytes(skb, ETH_HLEN + hlen, hdr, sizeof(hdr)) < 0)
		return 0;
	int len = opp_header_len(hdr);
	__u16 ports[2];
	if (len < 0 || bpf_skb_load_bytes(skb, ETH_HLEN + hlen + len, ports, sizeof(ports)) < 0)
		return 0;
	struct listener_key key = {.port = ports[1], .family = v4 ? 4 : 6, .proto = IPPROTO_UDP};
	if (v4)
		__builtin_memcpy(key.addr, ip + 16, 4);
	else
		__builtin_memcpy(key.addr, ip + 24, 16);
	const struct listener *l = bpf_map_lookup_elem(&toa_lb_listeners, &key);
	if (!l)
		return 0;
	__u32 slot = l->slot;
	if (remove_after_ip(skb, ETH_HLEN, v4, len) < 0)
		return 0;
	count(slot, CNT_UOA_STRIPPED);
	return 1;
}

/* The UOA as it goes on the wire: an opp header and the option, or the
 * option alone (ipo, in the first 20 bytes). Typed fields, not bytes at
 * offsets: clang turns &buf[k] on an aligned stack buffer into an OR on the
 * pointer, which the verifier refuses. An IPv4 client's address is 4 bytes
 * followed by zeros in the key: the option's length cuts it there. */
struct uoa_bytes {
	__u8 version;
	__u8 protocol;
	__u16 length;
	__u8 code;
	__u8 len;
	__u16 port;
	__u32 addr[4];
};

static __always_inline void uoa_bytes_of(struct uoa_bytes *uoa, const struct flow_key *key, int opp, __u32 grow)
{
	int client4 = key->family == 4;
	__u8 option = client4 ? 8 : 20;
	if (opp) {
		uoa->version = (client4 ? 1 : 2) << 4;
		uoa->protocol = IPPROTO_UDP;
		uoa->length = bpf_htons(grow);
		uoa->code = IPOPT_UOA;
		uoa->len = option;
		uoa->port = key->cport;
		uoa->addr[0] = key->client[0];
		uoa->addr[1] = key->client[1];
		uoa->addr[2] = key->client[2];
		uoa->addr[3] = key->client[3];
	} else {
		uoa->version = IPOPT_UOA;
		uoa->protocol = option;
		uoa->length = key->cport;
		uoa->code = ((const __u8 *)key->client)[0];
		uoa->len = ((const __u8 *)key->client)[1];
		uoa->port = ((const __u16 *)key->client)[1];
		uoa->addr[0] = key->client[1];
		uoa->addr[1] = key->client[2];
		uoa->addr[2] = key->client[3];
	}
}

/* Writes `uoa` (grow bytes) right after the fixed IP header of the UDP
 * datagram p and fixes the IP header. bpf_skb_adjust_room makes the room
 * there and leaves the UDP header where it was, so a CHECKSUM_PARTIAL skb's
 * csum_start stays right; the UDP checksum covers none of it. 0, -1 when
 * nothing was changed, -2 when the room was made but not filled. */
static __always_inline int write_uoa(struct __sk_buff *skb, const struct pkt *p, const struct uoa_bytes *uoa,
				     int opp, __u32 grow)
{
	if (bpf_skb_adjust_room(skb, (__s32)grow, BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, p->l3 + (p->l4 - p->l3), uoa, grow == 8 ? 8 : grow == 12 ? 12 : grow == 20 ? 20 : 24, 0) < 0)
		return -2;
	if (p->family == 4) {
		__u8 vihl = opp ? 0x45 : 0x40 | ((20 + grow) / 4);
		__u8 proto = opp ? IPPROTO_UOA_OPP : IPPROTO_UDP;
		__u16 tot = bpf_htons(p->end - p->l3 + grow);
		bpf_skb_store_bytes(skb, p->l3, &vihl, 1, 0);
		bpf_skb_store_bytes(skb, p->l3 + 2, &tot, 2, 0);
		bpf_skb_store_bytes(skb, p->l3 + 9, &proto, 1, 0);
		ipv4_checksum(skb, p->l3, opp ? 20 : 20 + grow);
	} else {
		__u8 next = IPPROTO_UOA_OPP;
		__u16 plen = bpf_htons(p->end - p->l4 + grow);
		bpf_skb_store_bytes(skb, p->l3 + 4, &plen, 2, 0);
		bpf_skb_store_bytes(skb, p->l3 + 6, &next, 1, 0);
	}
	return 0;
}

/* The payload bytes a carrier can stand in for (a jumbo frame's). */
#define CARRIER_MAX 9216
#define CSUM_CHUNK 512

/* What a datagram was before it became a carrier, to put it back. */
struct carrier_scratch {
	__u8 ip[40];
	__u8 udp[8];
	__u8 payload[CARRIER_MAX + 4];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct carrier_scratch);
} toa_lb_carrier SEC(".maps");

/* The negated one's-complement sum of s->payload[0..len) (zero padded to a
 * multiple of 4), in the chunks bpf_csum_diff takes: the diff that takes the
 * payload out of a checksum. */
__noinline int payload_sum(struct carrier_scratch *s, __u32 len)
{
	if (!s || len > CARRIER_MAX)
		return 0;
	__u32 len4 = (len + 3) & ~3U;
	__s64 sum = 0;
	for (int c = 0; c < CARRIER_MAX / CSUM_CHUNK; c++) {
		__u32 off = c * CSUM_CHUNK;
		if (off >= len4)
			break;
		__u32 n = len4 - off; /* a multiple of 4, at least 4 */
		if (n > CSUM_CHUNK)
			n = CSUM_CHUNK;
		/* 4..512 in a form the verifier can bound */
		__u32 size = ((n - 4) & (CSUM_CHUNK - 4)) + 4;
		sum = bpf_csum_diff((__be32 *)(s->payload + off), size, 0, 0, (__wsum)sum);
		if (sum < 0)
			return 0;
	}
	return (int)sum;
}

/* DPVS's answer to a datagram with no room for the UOA, at egress: an empty
 * datagram of the flow that carries it, sent just before (the backend learns
 * the client first). The datagram itself becomes the carrier (payload cut,
 * lengths and checksum moved by the helpers, which handle a PARTIAL and a
 * full checksum alike, the UOA written), a clone of it goes out now
 * (bpf_clone_redirect, unmarked: it passes through here untouched), then the
 * datagram is put back byte for byte from a per-CPU copy and goes on.
 * 1 when the carrier went. */
static __always_inline int send_carrier(struct __sk_buff *skb, const struct pkt *p, const struct uoa_bytes *uoa,
					int opp, __u32 grow)
{
	__u32 zero = 0;
	struct carrier_scratch *s = bpf_map_lookup_elem(&toa_lb_carrier, &zero);
	__u32 hlen = p->l4 - p->l3;
	__u32 udp_len = p->end - p->l4;
	if (!s || udp_len <= 8 || udp_len - 8 > CARRIER_MAX || hlen != (p->family == 4 ? 20 : 40))
		return 0;
	__u32 len = udp_len - 8;
	__u32 skb_len = skb->len;
	if (bpf_skb_load_bytes(skb, p->l3, s->ip, hlen == 20 ? 20 : 40) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4, s->udp, 8) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4 + 8, s->payload, len & 0x3fff) < 0)
		return 0;
	__builtin_memset(s->payload + (len & 0x3fff), 0, 4); /* the padding the sum reads */
	__u32 removed = payload_sum(s, len);

	/* The datagram becomes an empty one of the same flow. */
	if (bpf_skb_change_tail(skb, p->l4 + 8, 0) < 0)
		return 0;
	__u16 old_len = bpf_htons(udp_len), new_len = bpf_htons(8);
	__u32 check = p->l4 + 6;
	bpf_skb_store_bytes(skb, p->l4 + 4, &new_len, 2, 0);
	bpf_l4_csum_replace(skb, check, old_len, new_len, BPF_F_MARK_MANGLED_0 | 2);
	bpf_l4_csum_replace(skb, check, old_len, new_len, BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR | 2);
	bpf_l4_csum_replace(skb, check, 0, removed, BPF_F_MARK_MANGLED_0); /* a diff: the payload's negated sum */
	struct pkt c = *p;
	c.end = p->l4 + 8;
	if (p->family == 4) {
		__u16 tot = bpf_htons(hlen + 8);
		bpf_skb_store_bytes(skb, p->l3 + 2, &tot, 2, 0);
		ipv4_checksum(skb, p->l3, 20);
	} else {
		bpf_skb_store_bytes(skb, p->l3 + 4, &new_len, 2, 0);
	}
	int sent = 0;
	int written = write_uoa(skb, &c, uoa, opp, grow);
	if (written == 0)
		sent = bpf_clone_redirect(skb, skb->ifindex, 0) == 0;

	/* And back, byte for byte. */
	if (written != -1 && bpf_skb_adjust_room(skb, -(__s32)grow, BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, skb_len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, p->l3, s->ip, hlen == 20 ? 20 : 40, 0) < 0 ||
	    bpf_skb_store_bytes(skb, p->l4, s->udp, 8, 0) < 0 ||
	    bpf_skb_store_bytes(skb, p->l4 + 8, s->payload, len & 0x3fff, 0) < 0)
		return -1;
	return sent;
}

/* Writes the UOA naming the flow at `index` into a datagram at egress, after
 * NAT: an opp header (or, IPv4 with no options and format ipo, an IPv4
 * option) right after the fixed IP header; past the MTU, a carrier goes
 * ahead of the datagram instead. */
static __always_inline int uoa_egress(struct __sk_buff *skb, __u32 index)
{
	struct flow_slot *fs = bpf_map_lookup_elem(&toa_lb_flows, &index);
	if (!fs || fs->key.proto != IPPROTO_UDP || !(fs->flow.placement & PLACE_UOA))
		return TC_NEXT;
	__u32 slot = fs->flow.slot;
	struct pkt p;
	if (parse(skb, &p) < 0 || p.proto != IPPROTO_UDP)
		return TC_NEXT;
	int opp = fs->flow.kind == UOA_OPP || p.family == 6;
	__u32 hlen = p.l4 - p.l3;
	__u32 grow = (opp ? OPP_HEADER_LEN : 0) + (fs->key.family == 4 ? 8 : 20);
	struct uoa_bytes uoa = {};
	uoa_bytes_of(&uoa, &fs->key, opp, grow);
	__u32 mtu = 0;
	/* Room goes right after the fixed IP header: IPv4 options (which the
	 * ingress only strips when they hold a UOA) would be split. */
	if ((p.family == 4 && hlen != 20) || skb->gso_segs > 1) {
		count(slot, CNT_UOA_NO_ROOM);
		return TC_NEXT;
	}
	if (bpf_check_mtu(skb, 0, &mtu, (__s32)grow, 0) != BPF_MTU_CHK_RET_SUCCESS) {
		count(slot, CNT_UOA_NO_ROOM);
		int sent = send_carrier(skb, &p, &uoa, opp, grow);
		if (sent < 0)
			return TC_ACT_SHOT; /* could not be put back: it must not go half made */
		if (sent)
			count(slot, CNT_UOA_CARRIERS);
		return TC_NEXT;
	}
	int written = write_uoa(skb, &p, &uoa, opp, grow);
	if (written == -2)
		return TC_ACT_SHOT; /* the room is made: a datagram with garbage in it must not go */
	count(slot, written == 0 ? CNT_UOA_INJECTED : CNT_UOA_NO_ROOM);
	return TC_NEXT;
}

/* A datagram to a UDP listener: a new flow (none live for its addresses)
 * takes from the budget; the listener's mode marks it, and so does the gate
 * (config.gate_mark). `whole`: the datagram is not a first fragment, and has
 * no IPv6 extension headers (a UOA can be written into it at egress). */
static __always_inline int udp_ingress(struct __sk_buff *skb, const struct pkt *p, const struct listener *l,
				       const struct config *cfg, int whole)
{
	struct flow_key key;
	flow_key_of(&key, p);
	__u64 now = bpf_ktime_get_ns();
	struct flow *f = flow_find(&key, cfg);
	if (f && now - f->seen < cfg->udp_timeout_ns) {
		/* Refreshed at most every 100 ms: a write per datagram costs. */
		if (now - f->seen > 100000000ULL)
			f->seen = now;
	} else {
		if (!admit(l->slot))
			return TC_ACT_SHOT;
		struct flow cur = {.seen = now, .slot = l->slot, .placement = l->placement};
		if (l->mode == MODE_UOA) {
			cur.placement = PLACE_UOA;
			cur.kind = l->kind4;
			cur.len = l->placement;
		}
		flow_put(&key, &cur, cfg);
		f = flow_find(&key, cfg);
	}
	skb->mark |= cfg->gate_mark;
	if (l->mode == MODE_TRANSPARENT && cfg->transparent_mark)
		skb->mark |= cfg->transparent_mark;
	/* A client's own UOA in its IPv4 options: the options go (a client may
	 * not speak for itself; other options mean nothing past the LB). A
	 * first fragment's too: the reassembled datagram keeps its header. */
	__u32 ihl = p->l4 - p->l3;
	if (p->family == 4 && ihl > 20 && client_ipo(skb, p->l3, ihl - 20)) {
		if (remove_after_ip(skb, p->l3, 1, ihl - 20) == 0)
			count(l->slot, CNT_UOA_STRIPPED);
	}
	if (whole && f && (f->placement & PLACE_UOA) && f->len > 0) {
		f->len--;
		skb->mark = (skb->mark & ~(UOA_MARK | UOA_INDEX_MASK)) | UOA_MARK | (flow_index(&key, cfg) & UOA_INDEX_MASK);
	}
	return TC_NEXT;
}

SEC("classifier")
int toa_lb_ingress(struct __sk_buff *skb)
{
	struct pkt p;
	int parsed = parse(skb, &p);
	if (parsed == HIDDEN) {
		parsed = unhide(skb, &p);
		if (parsed == OPAQUE) {
			/* Whose it is cannot be told: counted for the host. */
			count(HOST_SLOT, CNT_UNREADABLE);
			return TC_ACT_SHOT;
		}
	}
	if (parsed == -1) {
		/* Not TCP or UDP: perhaps a client's opp datagram to a UDP listener. */
		if (!strip_client_opp(skb))
			return TC_NEXT;
		parsed = parse(skb, &p);
		if (parsed == -1)
			return TC_NEXT;
	}
	const struct listener *l = listener_of(&p, p.daddr, p.dport);
	if (!l)
		return TC_NEXT;
	if (parsed < 0) {
		count(l->slot, CNT_MALFORMED);
		return TC_NEXT;
	}
	if (parsed == UNREADABLE && p.proto == IPPROTO_TCP) {
		/* A client's TOA in it could not be stripped: it goes no further. */
		count(l->slot, CNT_UNREADABLE);
		return TC_ACT_SHOT;
	}
	__u32 zero = 0;
	const struct config *cfg = bpf_map_lookup_elem(&toa_lb_config, &zero);
	if (!cfg)
		return TC_NEXT;
	if (p.proto == IPPROTO_TCP)
		return tcp_ingress(skb, &p, l, cfg);
	return udp_ingress(skb, &p, l, cfg, parsed != UNREADABLE);
}

/* Egress of the backend-facing interface, when it is not the clients': only
 * marked datagrams get a UOA; everything else leaves after one load. */
SEC("classifier")
int toa_lb_backend_egress(struct __sk_buff *skb)
{
	__u32 mark = skb->mark;
	if (!(mark & UOA_MARK))
		return TC_NEXT;
	skb->mark = mark & ~(UOA_MARK | UOA_INDEX_MASK);
	return uoa_egress(skb, mark & UOA_INDEX_MASK);
}

/* Egress of the client-facing interface (and, on a one-armed LB, of the
 * backends' too: then it writes UOAs as well). */
SEC("classifier")
int toa_lb_egress(struct __sk_buff *skb)
{
	__u32 mark = skb->mark;
	if (mark & UOA_MARK) {
		skb->mark = mark & ~(UOA_MARK | UOA_INDEX_MASK);
		return uoa_egress(skb, mark & UOA_INDEX_MASK);
	}
	__u32 zero = 0;
	const struct config *cfg = bpf_map_lookup_elem(&toa_lb_config, &zero);
	if (!cfg)
		return TC_NEXT;
	int data = cfg->flags & CFG_DATA_PLACEMENT;
	/* Most segments leave here, before the parse: only SYN-ACKs matter
	 * (and data, when some listener places the TOA in data). */
	if (!data) {
		int flags = peek_tcp_flags(skb);
		if (flags >= 0 && (flags & (F_SYN | F_ACK)) != (F_SYN | F_ACK))
			return TC_NEXT;
	}
	struct pkt p;
	if (parse(skb, &p) < 0 || p.proto != IPPROTO_TCP)
		return TC_NEXT;
	int synack = (p.flags & (F_SYN | F_ACK)) == (F_SYN | F_ACK);
	__u32 payload = p.end - p.l4 - p.hlen;
	if (!synack && (!payload || !data))
		return TC_NEXT;
	struct tcp_flow *f = tcp_flow_find(tcp_flow_hash(&p, 0), cfg);
	if (!f)
		return TC_NEXT;
	if (payload && !(f->placement & BACKEND_SPOKE))
		f->placement |= BACKEND_SPOKE; /* written once: the slot is shared between CPUs */
	if (!synack)
		return TC_NEXT;
	f->backend_isn = p.seq;
	/* The client must leave room for the option added to its segments, when
	 * they may carry it. */
	if (!(f->placement & PLACE_CLAMP))
		return TC_NEXT;
	int optlen = p.hlen - 20;
	struct scratch *s = scratch();
	if (!s || load_options(skb, p.l4 + 20, s->old, optlen) < 0)
		return TC_NEXT;
	__builtin_memcpy(s->opts, s->old, OPT_BUF);
	if (clamp_area(s, optlen, p.family == 4 ? 8 : 20) <= 0)
		return TC_NEXT;
	if (rewrite_options(skb, p.l4 + 20, p.l4 + offsetof(struct tcphdr, check), s->old, s->opts, optlen) == 0)
		count(f->slot, CNT_MSS_CLAMPED);
	return TC_NEXT;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
