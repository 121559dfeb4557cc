/* What the BPF headers expect from bpf_helpers.h and the kernel's headers,
 * for a host build. */
#ifndef TOA_PARITY_HOST_H
#define TOA_PARITY_HOST_H

#include <linux/types.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#define AF_INET 2
#define AF_INET6 10

#endif
