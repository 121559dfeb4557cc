/* The kernel helper's find_toa (toa-server-shim/bpf/find_toa.h), callable from Rust. */
#include "host.h"
#include "find_toa.h"

/* opts: 64 bytes, zero padded past len. */
void parity_find_toa(const __u8 *opts, int len, const __u8 *kind_formats, struct found *out)
{
	find_toa(opts, len, kind_formats, out);
}
