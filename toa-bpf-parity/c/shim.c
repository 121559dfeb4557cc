/* The kernel helper's find_toa (toa-server-shim/bpf/find_toa.h), callable from Rust. */
#include "host.h"
#include "find_toa.h"

/* opts: 64 bytes, zero padded past len. */
void parity_find_toa(const __u8 *opts, int len, const __u8 *kind_formats, struct found *out)
{
	find_toa(opts, len, kind_formats, out);
}

#include "find_uoa.h"

/* The kernel helper's (and the injector's) UOA option search: opts is 64
 * bytes, zero padded past len. */
void parity_find_uoa_option(const __u8 *opts, int len, struct uoa_client *out)
{
	find_uoa_option(opts, len, out);
}

/* The opp header check: hdr is 4 bytes. */
int parity_opp_header_len(const __u8 *hdr)
{
	return opp_header_len(hdr);
}
