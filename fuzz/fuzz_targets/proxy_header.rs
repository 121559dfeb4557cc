//! The PROXY protocol header path (what `ToaListener` reads from trusted
//! load balancers) on arbitrary bytes: no panic, a header never claims more
//! bytes than it saw or than the limit, and a verdict on a prefix of the
//! input never contradicts the verdict on all of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toa_server_shim::proxy::{MAX_HEADER, Prefix, parse_prefix};

fuzz_target!(|data: &[u8]| {
    let whole = parse_prefix(data);
    if let Prefix::Header(header, len) = &whole {
        assert!(*len <= data.len() && *len <= MAX_HEADER);
        assert!(header.version == 1 || header.version == 2);
        // The header alone is the same header.
        assert_eq!(parse_prefix(&data[..*len]), whole);
    }
    // Fewer bytes: the same decision, or "need more" for a header still arriving.
    for cut in [1, 6, 12, 16, data.len() / 2] {
        if cut >= data.len() {
            continue;
        }
        match (parse_prefix(&data[..cut]), &whole) {
            (Prefix::Absent, Prefix::Absent) | (Prefix::Incomplete, _) => {}
            (Prefix::Invalid(_), Prefix::Invalid(_)) => {}
            (Prefix::Header(h, n), Prefix::Header(g, m)) => assert_eq!((&h, n), (g, *m)),
            (part, all) => panic!("{cut} bytes: {part:?}, all {}: {all:?}", data.len()),
        }
    }
});
