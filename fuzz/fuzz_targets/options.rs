//! The options walker on arbitrary bytes, with arbitrary formats and kinds.
#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use toa_core::{Format, Formats, Options};

fuzz_target!(|data: &[u8]| {
    // First byte: the enabled formats; second: a kind to renumber `toa` to.
    let (config, bytes) = data.split_at(data.len().min(2));
    let mut formats = Formats::NONE;
    if let Some(&bits) = config.first() {
        for (i, format) in Format::ALL.into_iter().enumerate() {
            if bits & (1 << i) != 0 {
                formats = formats.with(format);
            }
        }
    }
    if let Some(&kind) = config.get(1) {
        formats = formats.with_kind(Format::Toa, kind);
    }
    let options = Options::new(bytes, 20);
    let first = black_box(options.clone().first_toa(&formats));
    let all: Vec<_> = options.clone().toas(&formats).collect();
    // The fast path and the iterator agree: same first TOA, same error.
    match (&first, all.first()) {
        (Ok(None), None) => {}
        (Ok(Some(found)), Some(Ok(item))) => assert_eq!(found, item),
        (Err(err), _) => assert_eq!(Some(&Err(*err)), all.iter().find(|r| r.is_err())),
        (got, item) => panic!("first_toa {got:?} but the iterator starts with {item:?}"),
    }
    for raw in options.clone() {
        if let Ok(raw) = black_box(raw) {
            assert!(raw.offset >= 20 && raw.offset + raw.wire_len() <= 20 + bytes.len());
        }
    }
    let _ = black_box(options.tencent_meta());
});
