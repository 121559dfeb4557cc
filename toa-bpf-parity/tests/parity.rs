//! The eBPF programs' C parsers against toa-core, on the same inputs: golden
//! vectors, every format with renumbered and colliding kinds, and random and
//! mutated option areas of 0 to 40 bytes. Same verdict, same address, same
//! bytes, or the test fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use toa_bpf_parity::{Verdict, build_with_toa, clamp_mss, find_mss, find_toa, scan_options};
use toa_core::{Format, Formats, Options, Toa, kind};
use toa_lb_injector::datapath::kernel::injector::kind_formats as injector_kinds;
use toa_server_shim::ebpf::kind_formats as helper_kinds;

/// toa-core's answer, in the C function's terms.
fn reference(area: &[u8], formats: &Formats) -> Verdict {
    match Options::new(area, 0).first_toa(formats) {
        Ok(Some(found)) => Verdict::Found(found.toa.ip(), found.toa.port().unwrap_or(0)),
        Ok(None) => Verdict::None,
        Err(_) => Verdict::Malformed,
    }
}

fn assert_find_toa(area: &[u8], formats: &Formats) {
    assert_eq!(
        find_toa(area, &helper_kinds(formats)),
        reference(area, formats),
        "find_toa differs from toa-core on {area:?} with {formats:?}"
    );
}

/// A minimal IPv4 TCP packet (SYN-ACK) around an options area of a
/// multiple of 4 bytes, in a buffer with room for 40 bytes of options.
fn packet(area: &[u8]) -> (Vec<u8>, usize) {
    assert_eq!(area.len() % 4, 0);
    let total = 40 + area.len();
    let mut buf = vec![0u8; 100];
    buf[..20].copy_from_slice(&[
        0x45,
        0,
        0,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        6,
        0,
        0,
        203,
        0,
        113,
        2,
        203,
        0,
        113,
        10,
    ]);
    buf[20..40].copy_from_slice(&[
        0x9c,
        0x40,
        0,
        80,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        ((20 + area.len()) / 4 * 16) as u8,
        0x12,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    buf[40..total].copy_from_slice(area);
    (buf, total)
}

/// The options area of a packet `packet` made (after an edit).
fn options_of(buf: &[u8], len: usize) -> Vec<u8> {
    let header = usize::from(buf[32] >> 4) * 4;
    assert_eq!(len, 20 + header);
    buf[40..len].to_vec()
}

/// The options up to an EOL, NOPs left out: what a reader sees.
fn meaning(area: &[u8]) -> Vec<(u8, Vec<u8>)> {
    Options::new(area, 0)
        .map(|o| o.expect("well formed"))
        .filter(|o| o.kind != kind::NOP && o.kind != kind::EOL)
        .map(|o| (o.kind, o.data.to_vec()))
        .collect()
}

/// The injector's strip against toa_core::strip (which it mirrors with
/// NOPs instead of moving bytes), on an area of a multiple of 4 bytes.
fn assert_scan(area: &[u8]) {
    let c = scan_options(area, &injector_kinds());
    let after = &c.area[..area.len()];
    let (mut buf, len) = packet(area);
    match toa_core::strip(&mut buf, len, &Formats::ALL) {
        Ok(done) => {
            assert!(!c.malformed, "C calls {area:?} malformed, toa-core does not");
            assert_eq!(c.stripped, done.removed, "stripped count on {area:?}");
            assert_eq!(meaning(after), meaning(&options_of(&buf, done.len)), "stripped {area:?}");
        }
        Err(_) => {
            assert!(c.malformed, "toa-core calls {area:?} malformed, C does not");
            // What C leaves is well formed, holds no TOA, and every option in
            // it stands where it stood.
            let mut left = Options::new(after, 0);
            assert!(left.clone().all(|o| o.is_ok()), "C left {after:?} malformed (from {area:?})");
            let (mut buf, len) = packet(after);
            assert_eq!(toa_core::strip(&mut buf, len, &Formats::ALL).unwrap().removed, 0, "{after:?}");
            for o in left.by_ref().flatten() {
                if o.kind != kind::NOP && o.kind != kind::EOL {
                    assert_eq!(
                        &after[o.offset..o.offset + o.wire_len()],
                        &area[o.offset..o.offset + o.wire_len()]
                    );
                }
            }
        }
    }
    assert!(c.area[area.len()..].iter().all(|&b| b == 0), "C wrote past the area of {area:?}");
}

/// The injector's insert against toa_core::insert, on a well-formed area.
fn assert_build(area: &[u8], toa: &Toa) {
    let mut option = [0u8; 20];
    let n = toa.emit(Formats::ALL.kind(toa.format()), &mut option).unwrap();
    let c = build_with_toa(area, &option[..n]);
    let (mut buf, len) = packet(area);
    match toa_core::insert(&mut buf, len, toa, &Formats::ALL) {
        Ok(new_len) => assert_eq!(c, Some(options_of(&buf, new_len)), "insert {toa:?} into {area:?}"),
        Err(toa_core::Error::NoRoom { .. }) => assert_eq!(c, None, "no room for {toa:?} in {area:?}"),
        Err(e) => panic!("toa-core refused the well-formed {area:?}: {e}"),
    }
}

/// The injector's MSS clamp against toa_core::clamp_mss.
fn assert_clamp(area: &[u8], by: u16) {
    let (mut buf, len) = packet(area);
    let rust = toa_core::clamp_mss(&mut buf, len, by);
    let at = find_mss(area);
    match rust {
        Ok(Some(_)) => {
            let at = at.unwrap_or_else(|| panic!("C finds no MSS in {area:?}"));
            let (after, _) = clamp_mss(area, at, by);
            assert_eq!(after, options_of(&buf, len), "clamp {area:?} by {by}");
        }
        Ok(None) | Err(_) => assert_eq!(at, None, "C clamps {area:?}, toa-core does not"),
    }
}

// ---- golden vectors, written out field by field ----

#[test]
fn golden_vectors() {
    let defaults = Formats::ALL;
    let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    let v6_bytes = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    let with = |head: &[u8], addr: &[u8]| -> Vec<u8> { [head, addr].concat() };
    let cases: Vec<(Vec<u8>, Verdict)> = vec![
        // toa: kind 254, len 8, port 40000, 203.0.113.7
        (vec![254, 8, 0x9c, 0x40, 203, 0, 113, 7], Verdict::Found(v4, 40000)),
        // toa6: kind 254, len 20, port 40000, 2001:db8::7
        (with(&[254, 20, 0x9c, 0x40], &v6_bytes), Verdict::Found(v6, 40000)),
        // ali-v6: kind 253, len 20
        (with(&[253, 20, 0x9c, 0x40], &v6_bytes), Verdict::Found(v6, 40000)),
        // tencent: kind 200, len 8
        (vec![200, 8, 0x9c, 0x40, 203, 0, 113, 7], Verdict::Found(v4, 40000)),
        // ali-cdn: kind 28, len 7, version 1, IPv4; len 19, IPv6
        (vec![28, 7, 1, 203, 0, 113, 7, 0], Verdict::Found(v4, 0)),
        (with(&[28, 19, 1], &v6_bytes), Verdict::Found(v6, 0)),
        // MSS, SACK-permitted, timestamps, NOP, window scale, then a toa
        (
            vec![
                2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7, 254, 8, 0x9c, 0x40, 203, 0,
                113, 7,
            ],
            Verdict::Found(v4, 40000),
        ),
        // RFC 5482 User Timeout (kind 28, len 4) is not ali-cdn
        (vec![28, 4, 0x80, 0x10], Verdict::None),
        // a TOA after an EOL is padding
        (vec![0, 254, 8, 0x9c, 0x40, 203, 0, 113, 7], Verdict::None),
        // a TOA kind at a length no format uses
        (vec![254, 10, 0x9c, 0x40, 203, 0, 113, 7, 0, 0], Verdict::Malformed),
        // an option that overruns the area, a length under 2, a kind without its length
        (vec![2, 4, 5, 0xb4, 8, 10, 0, 0], Verdict::Malformed),
        (vec![3, 1, 254, 8, 0x9c, 0x40, 203, 0, 113, 7], Verdict::Malformed),
        (vec![1, 1, 1, 3], Verdict::Malformed),
        // empty
        (vec![], Verdict::None),
    ];
    for (area, want) in cases {
        assert_eq!(reference(&area, &defaults), want, "toa-core on {area:?}");
        assert_find_toa(&area, &defaults);
    }
}

#[test]
fn every_format_and_renumbering() {
    let addr4: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let addr6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
    for format in Format::ALL {
        let toa = match format {
            Format::Toa | Format::Tencent => Toa::new(format, addr4).unwrap(),
            Format::AliCdn => Toa::ali_cdn(1, addr6.ip()),
            _ => Toa::new(format, addr6).unwrap(),
        };
        for kind in [format.default_kind(), 30, 254, 253, 200, 28, 2, 8, 255] {
            let mut option = [0u8; 20];
            let n = toa.emit(kind, &mut option).unwrap();
            for enabled in [Formats::NONE.with(format), Formats::ALL, Formats::default()] {
                let formats = enabled.with_kind(format, kind);
                assert_find_toa(&option[..n], &formats);
                let mut area = vec![1, 1, 2, 4, 5, 0xb4];
                area.extend_from_slice(&option[..n]);
                assert_find_toa(&area, &formats);
            }
        }
    }
}

#[test]
fn golden_strip_insert_and_clamp() {
    let forged = [254, 8, 0x9c, 0x40, 203, 0, 113, 7];
    let syn = [2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
    let mut with_forged = syn.to_vec();
    with_forged.extend_from_slice(&forged);
    for area in [&syn[..], &with_forged, &[200, 8, 0, 1, 1, 2, 3, 4, 201, 6, 0, 0, 0, 9, 1, 1][..], &[]] {
        assert_scan(area);
    }
    let toa = Toa::new(Format::Toa, "203.0.113.2:40000".parse().unwrap()).unwrap();
    let toa6 = Toa::new(Format::Toa6, "[2001:db8::2]:40000".parse().unwrap()).unwrap();
    // Room, no room without reclaiming NOPs, no room at all.
    let full: Vec<u8> = [&syn[..], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]].concat();
    let packed: Vec<u8> =
        [&syn[..], &[8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0]].concat();
    for area in [&syn[..], &full, &packed, &[]] {
        assert_build(area, &toa);
        assert_build(area, &toa6);
    }
    for by in [0, 8, 20, 2000] {
        assert_clamp(&syn, by);
        assert_clamp(&[1, 1, 2, 4, 0, 60, 1, 1], by);
    }
    assert_clamp(&[2, 3, 5, 1], 8); // an MSS of the wrong length: left alone by both
    assert_clamp(&[2, 4, 5, 0xb4, 2, 3, 5, 1], 8);
}

// ---- random and mutated areas ----

/// Pieces an options area is made of.
#[derive(Clone, Debug)]
enum Piece {
    Nop,
    Eol,
    /// A TOA of this format (index), address bytes, port, emitted with its kind or another.
    Toa(usize, [u8; 16], u16, Option<u8>),
    /// Any option: kind, body (its length byte is right).
    Other(u8, Vec<u8>),
    /// Any bytes.
    Raw(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        2 => Just(Piece::Nop),
        1 => Just(Piece::Eol),
        4 => (0..5usize, any::<[u8; 16]>(), any::<u16>(), prop::option::weighted(0.2, any::<u8>()))
            .prop_map(|(f, a, p, k)| Piece::Toa(f, a, p, k)),
        3 => (prop_oneof![Just(2u8), Just(3), Just(4), Just(8), Just(28), Just(201), Just(202), any::<u8>()],
              prop::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(k, b)| Piece::Other(k, b)),
        1 => prop::collection::vec(any::<u8>(), 1..6).prop_map(Piece::Raw),
    ]
}

fn toa_of(format: Format, addr: [u8; 16], port: u16) -> Toa {
    let v4 = IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]));
    let v6 = IpAddr::V6(Ipv6Addr::from(addr));
    match format {
        Format::Toa | Format::Tencent => Toa::new(format, SocketAddr::new(v4, port)).unwrap(),
        Format::Toa6 | Format::AliV6 => Toa::new(format, SocketAddr::new(v6, port)).unwrap(),
        Format::AliCdn => Toa::ali_cdn(port as u8, if port % 2 == 0 { v4 } else { v6 }),
    }
}

/// Concatenates the pieces (TOAs emitted with `formats`' kinds unless the
/// piece says otherwise), flips bytes, cuts to at most 40 bytes.
fn area(pieces: &[Piece], formats: &Formats, flips: &[(usize, u8)], cut: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Nop => out.push(kind::NOP),
            Piece::Eol => out.push(kind::EOL),
            Piece::Toa(f, addr, port, kind) => {
                let format = Format::ALL[*f];
                let mut buf = [0u8; 20];
                let n = toa_of(format, *addr, *port)
                    .emit(kind.unwrap_or(formats.kind(format)), &mut buf)
                    .unwrap();
                out.extend_from_slice(&buf[..n]);
            }
            Piece::Other(kind, body) => {
                out.push(*kind);
                out.push(body.len() as u8 + 2);
                out.extend_from_slice(body);
            }
            Piece::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }
    out.truncate(cut.min(40));
    for &(at, byte) in flips {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] = byte;
        }
    }
    out
}

fn formats() -> impl Strategy<Value = Formats> {
    let kind = prop_oneof![Just(254u8), Just(253), Just(200), Just(28), Just(30), Just(2), any::<u8>()];
    (0u8..32, prop::collection::vec(prop::option::weighted(0.3, kind), 5)).prop_map(|(enabled, kinds)| {
        let mut formats = Formats::NONE;
        for (i, format) in Format::ALL.into_iter().enumerate() {
            if enabled & (1 << i) != 0 {
                formats = formats.with(format);
            }
            if let Some(kind) = kinds[i] {
                formats = formats.with_kind(format, kind);
            }
        }
        formats
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn find_toa_matches_toa_core(
        pieces in prop::collection::vec(piece(), 0..8),
        formats in formats(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        cut in 0usize..=40,
    ) {
        assert_find_toa(&area(&pieces, &formats, &flips, cut), &formats);
    }

    #[test]
    fn find_toa_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..=40), formats in formats()) {
        assert_find_toa(&bytes, &formats);
    }

    #[test]
    fn injector_matches_toa_core(
        pieces in prop::collection::vec(piece(), 0..8),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        words in 0usize..=10,
        toa in (0..5usize, any::<[u8; 16]>(), any::<u16>()),
        by in prop_oneof![Just(8u16), Just(20), any::<u16>()],
    ) {
        // A TCP options area is a multiple of 4 bytes: pad with NOPs, then cut.
        let mut bytes = area(&pieces, &Formats::ALL, &flips, 40);
        bytes.resize(40, kind::NOP);
        bytes.truncate(words * 4);
        assert_scan(&bytes);
        // Insert and clamp run on what the strip left (well formed, no TOA).
        let scanned = scan_options(&bytes, &injector_kinds()).area[..bytes.len()].to_vec();
        assert_build(&scanned, &toa_of(Format::ALL[toa.0], toa.1, toa.2));
        assert_clamp(&scanned, by);
    }
}

/// An IPv4-format option list with a UOA somewhere in it (or not), NOPs
/// and other options around, perhaps cut or with flipped bytes.
fn uoa_area() -> impl Strategy<Value = Vec<u8>> {
    let option = prop_oneof![
        Just(vec![1u8]),
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| {
            let mut o = vec![0x1f, 8];
            o.extend_from_slice(&p.to_be_bytes());
            o.extend_from_slice(&a);
            o
        }),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| {
            let mut o = vec![0x1f, 20];
            o.extend_from_slice(&p.to_be_bytes());
            o.extend_from_slice(&a);
            o
        }),
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(code, body)| {
            let mut o = vec![code.max(2), body.len() as u8 + 2];
            o.extend_from_slice(&body);
            o
        }),
    ];
    (prop::collection::vec(option, 0..5), prop::collection::vec((0usize..40, any::<u8>()), 0..3), 0usize..=40)
        .prop_map(|(options, flips, cut)| {
            let mut area: Vec<u8> = options.concat();
            area.truncate(40);
            for (at, byte) in flips {
                if !area.is_empty() {
                    let n = area.len();
                    area[at % n] = byte;
                }
            }
            if cut < area.len() && cut % 3 == 0 {
                area.truncate(cut);
            }
            area
        })
}

/// What toa-core says of a UOA option list, as a verdict.
fn uoa_reference(area: &[u8]) -> toa_bpf_parity::UoaVerdict {
    use toa_bpf_parity::UoaVerdict;
    match toa_core::uoa::find_uoa_in_options(area) {
        Ok(Some(client)) => UoaVerdict::Found(client),
        Ok(None) => UoaVerdict::None,
        Err(_) => UoaVerdict::Malformed,
    }
}

#[test]
fn golden_uoa_options() {
    let v4 = [0x1f, 8, 0x9c, 0x40, 203, 0, 113, 7];
    use toa_bpf_parity::UoaVerdict;
    assert_eq!(toa_bpf_parity::find_uoa_option(&v4), UoaVerdict::Found("203.0.113.7:40000".parse().unwrap()));
    let mut v6 = vec![1, 1, 0x1f, 20, 0, 53];
    v6.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(toa_bpf_parity::find_uoa_option(&v6), UoaVerdict::Found("[2001:db8::7]:53".parse().unwrap()));
    assert_eq!(toa_bpf_parity::find_uoa_option(&[1, 1, 0, 0x1f, 8]), UoaVerdict::None, "after EOL");
    assert_eq!(
        toa_bpf_parity::find_uoa_option(&[0x1f, 9, 0, 0, 0, 0, 0, 0, 0]),
        UoaVerdict::Malformed,
        "length 9"
    );
    assert_eq!(toa_bpf_parity::find_uoa_option(&[7, 3, 0, 0x1f]), UoaVerdict::Malformed, "cut short");
    for (hdr, len) in
        [([0x10, 17, 0, 12], Some(12)), ([0x20, 17, 0, 24], Some(24)), ([0x30, 17, 0, 12], None)]
    {
        assert_eq!(toa_bpf_parity::opp_header_len(hdr), len, "{hdr:?}");
    }
    // Past 44 bytes the helper refuses what toa-core would read (no LB sends one).
    assert_eq!(toa_bpf_parity::opp_header_len([0x10, 17, 0, 48]), None);
    assert_eq!(toa_bpf_parity::opp_header_len([0x11, 17, 0, 12]), None, "reserved bits");
    assert_eq!(toa_bpf_parity::opp_header_len([0x10, 6, 0, 12]), None, "not UDP next");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// The helper's UOA search says what toa-core says, on lists an LB
    /// writes and on mutated and arbitrary ones.
    #[test]
    fn find_uoa_matches_toa_core(area in uoa_area()) {
        let c = toa_bpf_parity::find_uoa_option(&area);
        prop_assert_eq!(c, uoa_reference(&area), "{:?}", area);
    }

    #[test]
    fn find_uoa_on_any_bytes(area in prop::collection::vec(any::<u8>(), 0..=40)) {
        let c = toa_bpf_parity::find_uoa_option(&area);
        prop_assert_eq!(c, uoa_reference(&area), "{:?}", area);
    }
}
