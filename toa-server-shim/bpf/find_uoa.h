/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * find_uoa.h: the kernel helper's UOA parsers (DPVS include/uoa.h formats),
 * kept free of BPF helpers so that the same source also compiles for the
 * host, where toa-bpf-parity checks it against toa_core::uoa.
 *
 *   ipo: an IPv4 option 0x1f: code(1) len(1: 8 or 20) port(2) addr(4 or 16)
 *   opp: IP protocol 248 before UDP: version(4 bits: 1 or 2) reserved(4 bits)
 *        protocol(1) length(2: header + options), then options as in ipo
 *
 * Needs __u8/__u16/__u32 (linux/types.h), __always_inline and AF_INET/AF_INET6.
 */
#ifndef TOA_FIND_UOA_H
#define TOA_FIND_UOA_H

#define IPOPT_UOA 0x1f
#define IPPROTO_UOA_OPP 248
#define OPP_HEADER_LEN 4
/* An opp header with more than 40 bytes of options is refused (malformed). */
#define OPP_MAX_LEN (OPP_HEADER_LEN + 40)

/* A client named by a UOA, or why there is none. */
struct uoa_client {
	__u32 addr[4];  /* network order; IPv4 in addr[0] */
	__u16 port;     /* network order */
	__u8 family;    /* AF_INET or AF_INET6 */
	__s8 result;    /* 1 found, 0 none, -1 malformed */
};

/* Searches the IPv4-format option list opts[0..len) (len <= 40; opts is 64
 * bytes, zero padded, so every masked index is in bounds) for the UOA
 * option; *c says what was found, as toa_core::uoa::find_uoa_in_options.
 * As in find_toa.h, the loop only locates (its index masked, so that the
 * verifier sees few distinct states) and every exit writes all of *c. */
static __always_inline void find_uoa_option(const __u8 *opts, int len, struct uoa_client *c)
{
	int i = 0;
	int at = -1;
	__u8 olen = 0;
	__builtin_memset(c, 0, sizeof(*c));
	for (int n = 0; n < 40; n++) {
		if (i >= len)
			break;
		__u8 code = opts[i & 63];
		if (code == 0)
			break;
		if (code == 1) {
			i = (i + 1) & 63;
			continue;
		}
		olen = opts[(i + 1) & 63];
		if (i + 1 >= len || olen < 2 || i + olen > len) {
			c->result = -1;
			return;
		}
		if (code == IPOPT_UOA) {
			if (olen != 8 && olen != 20) {
				c->result = -1;
				return;
			}
			at = i;
			break;
		}
		i = (i + olen) & 63;
	}
	if (at < 0)
		return;
	__u8 p[2] = {opts[(at + 2) & 63], opts[(at + 3) & 63]};
	__builtin_memcpy(&c->port, p, 2);
	__u8 a[16] = {};
	for (int k = 0; k < 16; k++)
		a[k] = opts[(at + 4 + k) & 63];
	__builtin_memcpy(c->addr, a, 16);
	if (olen == 8) {
		c->family = AF_INET;
		c->addr[1] = 0;
		c->addr[2] = 0;
		c->addr[3] = 0;
	} else {
		c->family = AF_INET6;
	}
	c->result = 1;
}

/* Checks the fixed part of an opp header: hdr[0..4). Returns its length
 * (header and options, 4..OPP_MAX_LEN) or -1 when it is malformed: a version
 * other than 1 or 2, reserved bits set, a next protocol other than UDP. */
static __always_inline int opp_header_len(const __u8 *hdr)
{
	__u8 version = hdr[0] >> 4;
	int len = (hdr[2] << 8) | hdr[3];
	if (version < 1 || version > 2 || (hdr[0] & 0x0f) || hdr[1] != 17)
		return -1;
	if (len < OPP_HEADER_LEN || len > OPP_MAX_LEN)
		return -1;
	return len;
}

#endif
