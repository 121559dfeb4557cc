/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * find_toa.h: the kernel helper's TCP options parser, kept free of BPF
 * helpers so that the same source also compiles for the host, where
 * toa-bpf-parity checks it against toa-core (found / none / malformed, and
 * the same address) on golden, random and mutated option areas.
 *
 * Needs __u8/__u16/__u32 (linux/types.h), __always_inline and AF_INET/AF_INET6.
 */
#ifndef TOA_FIND_TOA_H
#define TOA_FIND_TOA_H

/* Formats, as bits of toa_config.enabled and indexes of toa_config.kinds (toa_core::Format order). */
#define FMT_TOA 0     /* kind 254, len 8:  port, IPv4 */
#define FMT_TOA6 1    /* kind 254, len 20: port, IPv6 */
#define FMT_ALI_V6 2  /* kind 253, len 20: port, IPv6 */
#define FMT_TENCENT 3 /* kind 200, len 8:  port, IPv4 */
#define FMT_ALI_CDN 4 /* kind 28, len 7/19: version, IPv4/IPv6, no port */
#define NR_FORMATS 5

/* What a search of one options area gave. */
struct found {
	int result;     /* 1 found, 0 none, -1 malformed */
	__u8 family;
	__u16 port;     /* network order */
	__u32 addr[4];
};

#define BIT(f) (1 << (f))

/* Searches the options area opts[0..len) (len <= 40; opts is 64 bytes, zero
 * padded, so every masked index is in bounds) for the first TOA of an
 * enabled format. kind_formats[kind] holds the bits of the enabled formats
 * that use that kind (toa_config.kind_formats). Malformed lengths, and a
 * format's kind with a length it does not use, are errors, as in toa_core. The loop only locates; decoding
 * happens once, after it, which keeps the verifier's path count small. */
static __always_inline void find_toa(const __u8 *opts, int len, const __u8 *kind_formats, struct found *out)
{
	int i = 0;
	int at = -1;
	__u8 olen = 0;
	__u8 bits = 0;

	/* Every exit leaves *out fully written, so that the verifier sees equal
	 * states after each search and prunes them. */
	__builtin_memset(out, 0, sizeof(*out));
	for (int n = 0; n < 40; n++) {
		if (i >= len)
			break;
		__u8 kind = opts[i & 63];
		if (kind == 0) /* EOL */
			break;
		if (kind == 1) { /* NOP */
			i = (i + 1) & 63;
			continue;
		}
		olen = opts[(i + 1) & 63];
		if (i + 1 >= len || olen < 2 || i + olen > len) {
			out->result = -1;
			return;
		}
		bits = kind_formats[kind];
		if (bits) {
			if (((bits & (BIT(FMT_TOA) | BIT(FMT_TENCENT))) && olen == 8) ||
			    ((bits & (BIT(FMT_TOA6) | BIT(FMT_ALI_V6))) && olen == 20) ||
			    ((bits & BIT(FMT_ALI_CDN)) && (olen == 7 || olen == 19))) {
				at = i;
				break;
			}
			/* kind 28 is also RFC 5482 User Timeout: not ours at other lengths */
			if (bits & ~BIT(FMT_ALI_CDN)) {
				out->result = -1;
				return;
			}
		}
		i = (i + olen) & 63;
	}
	if (at < 0)
		return;

	int cdn = olen == 7 || olen == 19;
	int body = at + 2;
	if (cdn) {
		out->port = 0;
		body += 1; /* version byte */
	} else {
		/* kept in network order: copy the bytes, whatever the host's endianness */
		__u8 p[2] = {opts[body & 63], opts[(body + 1) & 63]};
		__builtin_memcpy(&out->port, p, 2);
		body += 2;
	}
	out->family = (olen == 8 || olen == 7) ? AF_INET : AF_INET6;
	__u8 a[16] = {};
	for (int k = 0; k < 16; k++)
		a[k] = opts[(body + k) & 63];
	__builtin_memcpy(out->addr, a, 16);
	if (out->family == AF_INET) {
		out->addr[1] = 0;
		out->addr[2] = 0;
		out->addr[3] = 0;
	}
	out->result = 1;
}

#endif
