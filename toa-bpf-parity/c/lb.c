/* The TOA injector's options logic (toa-lb-injector/bpf/options.h), callable from Rust. */
#include "host.h"
#include "options.h"

/* Every buffer: OPT_BUF (64) bytes, zero padded. */
void parity_scan_options(__u8 *opts, int len, const __u8 *kind_formats, struct scan *out)
{
	scan_options(opts, len, kind_formats, out);
}

int parity_build_with_toa(const __u8 *old, int old_len, const __u8 *toa, int toa_len, __u8 *out)
{
	return build_with_toa(old, old_len, toa, toa_len, out);
}

int parity_find_mss(const __u8 *opts, int len)
{
	return find_mss(opts, len);
}

int parity_clamp_mss(__u8 *opts, int at, int by)
{
	return clamp_mss(opts, at, by);
}
