/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * options.h: the TCP options logic of the TOA injector, kept free of BPF
 * helpers so that the same source also compiles for the host, where a test
 * harness checks it against toa-core (toa-lb-injector/tests/c_options.rs).
 *
 * Every buffer is OPT_BUF bytes (zero padded) and every index is masked with
 * OPT_MASK, which keeps each access in bounds for the verifier; the options
 * area itself is at most OPT_MAX bytes. Positions are masked again each time
 * they move (a no-op, as they stay below OPT_MAX): the verifier then no
 * longer knows their exact value, so the states of different paths through a
 * loop compare equal and are pruned, where exact positions would make every
 * path distinct and exceed its budget.
 */
#ifndef TOA_LB_OPTIONS_H
#define TOA_LB_OPTIONS_H

#define OPT_MAX 40
#define OPT_BUF 64
#define OPT_MASK 63

/* An index masked in a way clang cannot drop: when it has proved the value
 * in bounds it removes a plain `& OPT_MASK`, which the verifier then misses. */
#ifdef __bpf__
#define OPT_AT(x) ({ __u32 __v = (x); asm volatile("%0 &= 63" : "+r"(__v)); __v; })
#else
#define OPT_AT(x) ((__u32)(x) & OPT_MASK)
#endif

#define OPT_EOL 0
#define OPT_NOP 1
#define OPT_MSS 2

/* Formats, as bits of kind_formats[] (toa_core::Format order). */
#define FMT_TOA 0     /* kind 254, len 8:  port, IPv4 */
#define FMT_TOA6 1    /* kind 254, len 20: port, IPv6 */
#define FMT_ALI_V6 2  /* kind 253, len 20: port, IPv6 */
#define FMT_TENCENT 3 /* kind 200, len 8:  port, IPv4 */
#define FMT_ALI_CDN 4 /* kind 28, len 7/19: version, IPv4/IPv6, no port */
#define FMT_BIT(f) (1 << (f))
/* Not a format: Tencent's companion options (201 VPC id, 202 VIP), set on
 * their kinds in kind_formats[] when tencent is enabled. */
#define FMT_COMPANION 5

/* The lowest MSS a clamp writes (toa_core::MIN_MSS, Linux's tcp_min_snd_mss). */
#define MIN_MSS 48

/* What scan_options found and did. */
struct scan {
	int stripped;  /* TOA-format options overwritten with NOPs */
	int malformed; /* 1: an option overran the area (EOL written there) */
};

/*
 * Whether an option of this kind and length is one a client may not send:
 * a TOA of an enabled format, a kind only TOA formats use at any length (a
 * malformed TOA), or Tencent's companions (FMT_COMPANION). Kind
 * 28 at other lengths than 7 and 19 is RFC 5482 User Timeout and stays.
 * The same classification as toa_core::strip.
 */
static __always_inline int toa_kind(const __u8 *kind_formats, __u8 kind, __u8 len)
{
	__u8 bits = kind_formats[kind];
	if (!bits)
		return 0;
	if (bits & ~FMT_BIT(FMT_ALI_CDN))
		return 1;
	return len == 7 || len == 19;
}

/*
 * Walks opts[0..len) (len <= OPT_MAX): every TOA-format option is overwritten
 * with NOPs (no size change: nothing else moves), and an option that overruns
 * the area (length < 2, or past the end) ends it: an EOL is written over its
 * kind byte, so that no reader looks past it.
 * (One pass to find, one to write: nested loops would exhaust the verifier.)
 */
static __always_inline void scan_options(__u8 *opts, int len, const __u8 *kind_formats, struct scan *out)
{
	__u64 strip = 0; /* bit k: byte k becomes a NOP */
	int i = 0, stripped = 0, malformed_at = -1;

	for (int n = 0; n < OPT_MAX; n++) {
		if (i >= len)
			break;
		__u8 kind = opts[i & OPT_MASK];
		if (kind == OPT_EOL)
			break;
		if (kind == OPT_NOP) {
			i = (i + 1) & OPT_MASK;
			continue;
		}
		__u8 olen = opts[(i + 1) & OPT_MASK];
		if (i + 1 >= len || olen < 2 || i + olen > len) {
			malformed_at = i;
			break;
		}
		if (toa_kind(kind_formats, kind, olen)) {
			strip |= ((1ULL << olen) - 1) << i;
			stripped++;
		}
		i = (i + olen) & OPT_MASK;
	}
	for (int k = 0; k < OPT_MAX; k++)
		if (strip & (1ULL << k))
			opts[k] = OPT_NOP;
	if (malformed_at >= 0)
		opts[malformed_at & OPT_MASK] = OPT_EOL;
	out->stripped = stripped;
	out->malformed = malformed_at >= 0;
}

/*
 * Builds in `out` the options area with `toa` (toa_len bytes) first, as
 * toa_core::insert does: the TOA, NOPs to a multiple of 4, then the old
 * options; when that exceeds OPT_MAX, the old options' NOPs (and anything
 * after an EOL) are dropped and the area is padded with EOL instead. `old`
 * must be well formed (scan_options made it so). Returns the new length (a
 * multiple of 4), or -1 when even that does not fit.
 */
static __always_inline int build_with_toa(const __u8 *old, int old_len, const __u8 *toa, int toa_len,
					  __u8 *out)
{
	int n;

	if (old_len < 0 || old_len > OPT_MAX || toa_len < 2 || toa_len > 20)
		return -1;
	/* toa is at least 20 bytes, zero padded: what follows the option is overwritten below. */
	__builtin_memcpy(out, toa, 20);
	n = toa_len;
	if (((toa_len + 3) & ~3) + old_len <= OPT_MAX) {
		for (int pad = 0; pad < 3 && (n & 3); pad++) {
			out[n & OPT_MASK] = OPT_NOP;
			n = (n + 1) & OPT_MASK;
		}
		for (int k = 0; k < OPT_MAX; k++) {
			if (k >= old_len)
				break;
			out[(n + k) & OPT_MASK] = old[k & OPT_MASK];
		}
		return n + old_len;
	}
	/* Reclaim NOPs: they only align what follows. Mark the bytes to keep,
	 * then copy them (one loop each: nested loops exhaust the verifier). */
	__u64 keep = 0;
	int i = 0;
	for (int it = 0; it < OPT_MAX; it++) {
		if (i >= old_len)
			break;
		__u8 kind = old[i & OPT_MASK];
		if (kind == OPT_EOL)
			break;
		if (kind == OPT_NOP) {
			i = (i + 1) & OPT_MASK;
			continue;
		}
		__u8 olen = old[(i + 1) & OPT_MASK];
		if (olen < 2 || i + olen > old_len)
			return -1;
		keep |= ((1ULL << olen) - 1) << i;
		i = (i + olen) & OPT_MASK;
	}
	for (int k = 0; k < OPT_MAX; k++) {
		if (!(keep & (1ULL << k)))
			continue;
		if (n >= OPT_MAX)
			return -1;
		out[n & OPT_MASK] = old[k];
		n = (n + 1) & OPT_MASK;
	}
	for (int pad = 0; pad < 3 && (n & 3); pad++) {
		out[n & OPT_MASK] = OPT_EOL;
		n = (n + 1) & OPT_MASK;
	}
	return n;
}

/* The first MSS value's offset in an options area, or -1: also when an
 * option is malformed or an MSS option has another length than 4 (left
 * alone, as toa_core::clamp_mss refuses such a header). */
static __always_inline int find_mss(const __u8 *opts, int len)
{
	int i = 0, at = -1;
	for (int n = 0; n < OPT_MAX; n++) {
		if (i >= len)
			break;
		__u8 kind = opts[i & OPT_MASK];
		if (kind == OPT_EOL)
			break;
		if (kind == OPT_NOP) {
			i = (i + 1) & OPT_MASK;
			continue;
		}
		__u8 olen = opts[(i + 1) & OPT_MASK];
		if (i + 1 >= len || olen < 2 || i + olen > len)
			return -1;
		if (kind == OPT_MSS) {
			if (olen != 4)
				return -1;
			if (at < 0)
				at = i + 2;
		}
		i = (i + olen) & OPT_MASK;
	}
	return at;
}

/*
 * Lowers the MSS at opts[at..at+2) by `by` (never below MIN_MSS, never
 * raising it), as toa_core::clamp_mss does. Returns 1 when it changed.
 */
static __always_inline int clamp_mss(__u8 *opts, int at, int by)
{
	if (at < 2 || at > OPT_MAX - 2)
		return 0;
	int old = (opts[OPT_AT(at)] << 8) | opts[OPT_AT(at + 1)];
	if (old <= MIN_MSS)
		return 0;
	int new = old - by;
	if (new < MIN_MSS)
		new = MIN_MSS;
	if (new == old)
		return 0;
	opts[OPT_AT(at)] = new >> 8;
	opts[OPT_AT(at + 1)] = new & 0xff;
	return 1;
}

#endif
