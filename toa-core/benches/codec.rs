//! Criterion benches: one group per operation, each with an etherparse
//! baseline measured in the same run. `scripts/bench.sh` prints the ratios.
//!
//! The baselines do what a user of etherparse would write for the same job:
//! slice or decode the headers, change the options, recompute the checksums
//! in full, and serialise the packet.
// criterion_group! generates undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use etherparse::{
    NetHeaders, PacketBuilder, PacketHeaders, PayloadSlice, SlicedPacket, TransportHeader, TransportSlice,
};
use toa_core::{Format, Formats, TcpPacket, Toa, clamp_mss, insert, strip};

const SRC: [u8; 4] = [100, 125, 0, 1];
const DST: [u8; 4] = [192, 0, 2, 10];
/// MSS 1460, SACK permitted, timestamps, NOP, window scale 7: a Linux SYN.
const SYN_OPTIONS: [u8; 20] = [2, 4, 5, 180, 4, 2, 8, 10, 0, 1, 226, 64, 0, 0, 0, 0, 1, 3, 3, 7];
/// NOP, NOP, timestamps: a Linux data segment.
const DATA_OPTIONS: [u8; 12] = [1, 1, 8, 10, 0, 1, 226, 64, 0, 0, 0, 9];
const TOA: [u8; 8] = [254, 8, 0x9c, 0x40, 203, 0, 113, 7];

fn syn(options: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(SRC, DST, 64).tcp(40000, 80, 1000, 64240).syn();
    let builder = builder.options_raw(options).expect("options fit");
    let mut out = Vec::new();
    builder.write(&mut out, &[]).expect("write");
    out
}

/// A full-sized data segment: 20 + 32 + 1448 = 1500 bytes.
fn data_segment() -> Vec<u8> {
    let builder = PacketBuilder::ipv4(SRC, DST, 64).tcp(40000, 80, 1001, 502).ack(7).psh();
    let builder = builder.options_raw(&DATA_OPTIONS).expect("options fit");
    let payload: Vec<u8> = (0..1448u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    builder.write(&mut out, &payload).expect("write");
    assert_eq!(out.len(), 1500);
    out
}

fn with_toa(packet: &[u8]) -> Vec<u8> {
    let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    let mut buf = packet.to_vec();
    buf.resize(packet.len() + 64, 0);
    let len = insert(&mut buf, packet.len(), &toa, &Formats::default()).unwrap();
    buf.truncate(len);
    buf
}

/// What a backend wants from a SYN: the client address, if any.
fn find(packet: &[u8], formats: &Formats) -> Option<SocketAddr> {
    let packet = TcpPacket::new_checked(packet).ok()?;
    packet.toa(formats).ok()??.toa.socket_addr()
}

/// The baseline for finding: etherparse slices the packet, then a plain loop
/// walks the options (etherparse's own option iterator stops at unknown kinds).
fn etherparse_find(packet: &[u8]) -> Option<SocketAddr> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else { return None };
    let options = tcp.options();
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*options.get(i + 1)?);
                if len < 2 || i + len > options.len() {
                    return None;
                }
                if kind == 254 && len == 8 {
                    let o = &options[i..i + 8];
                    let ip = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
                    return Some(SocketAddr::from((ip, u16::from_be_bytes([o[2], o[3]]))));
                }
                i += len;
            }
        }
    }
    None
}

/// The baseline for edits: decode with etherparse, let `edit` change the TCP
/// header, recompute both checksums in full, serialise into `out`.
fn etherparse_rewrite(packet: &[u8], out: &mut [u8], edit: impl FnOnce(&mut etherparse::TcpHeader)) -> usize {
    let headers = PacketHeaders::from_ip_slice(packet).expect("valid");
    let Some(NetHeaders::Ipv4(mut ip, _)) = headers.net else { panic!("ipv4") };
    let Some(TransportHeader::Tcp(mut tcp)) = headers.transport else { panic!("tcp") };
    let PayloadSlice::Tcp(payload) = headers.payload else { panic!("tcp payload") };
    edit(&mut tcp);
    ip.set_payload_len(tcp.header_len() + payload.len()).expect("fits");
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).expect("fits");
    let total = out.len();
    let mut cursor = &mut out[..];
    ip.write(&mut cursor).expect("room");
    tcp.write(&mut cursor).expect("room");
    cursor.write_all(payload).expect("room");
    total - cursor.len()
}

fn etherparse_insert(packet: &[u8], out: &mut [u8]) -> usize {
    etherparse_rewrite(packet, out, |tcp| {
        let mut options = [0u8; 40];
        let old = tcp.options.as_slice();
        options[..8].copy_from_slice(&TOA);
        options[8..8 + old.len()].copy_from_slice(old);
        let len = 8 + old.len();
        tcp.set_options_raw(&options[..len]).expect("fits");
    })
}

fn etherparse_strip(packet: &[u8], out: &mut [u8]) -> usize {
    etherparse_rewrite(packet, out, |tcp| {
        let mut options = [0u8; 40];
        let mut len = 0;
        let old = tcp.options.as_slice();
        let mut i = 0;
        while i < old.len() {
            let n = if old[i] <= 1 { 1 } else { usize::from(old[i + 1]) };
            if old[i] != 254 {
                options[len..len + n].copy_from_slice(&old[i..i + n]);
                len += n;
            }
            i += n;
        }
        tcp.set_options_raw(&options[..len]).expect("fits");
    })
}

fn etherparse_clamp(packet: &[u8], out: &mut [u8]) -> usize {
    etherparse_rewrite(packet, out, |tcp| {
        let mut options = [0u8; 40];
        let old = tcp.options.as_slice();
        options[..old.len()].copy_from_slice(old);
        let mut i = 0;
        while i < old.len() {
            let n = if old[i] <= 1 { 1 } else { usize::from(old[i + 1]) };
            if old[i] == 2 && n == 4 {
                let mss = u16::from_be_bytes([old[i + 2], old[i + 3]]) - 8;
                options[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
            }
            i += n;
        }
        tcp.set_options_raw(&options[..old.len()]).expect("fits");
    })
}

/// Benches `ours` and `baseline` editing a fresh copy of `packet` each time.
fn edit_group(
    c: &mut Criterion,
    name: &str,
    packet: &[u8],
    ours: impl Fn(&mut [u8], usize) -> usize,
    baseline: impl Fn(&[u8], &mut [u8]) -> usize,
) {
    let mut group = c.benchmark_group(name);
    let fresh = || {
        let mut buf = packet.to_vec();
        buf.resize(packet.len() + 64, 0);
        buf
    };
    group.bench_function("toa-core", |b| {
        b.iter_batched_ref(fresh, |buf| black_box(ours(buf, packet.len())), BatchSize::SmallInput)
    });
    group.bench_function("etherparse", |b| {
        b.iter_batched_ref(fresh, |out| black_box(baseline(packet, out)), BatchSize::SmallInput)
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let formats = Formats::default();
    let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    let syn60 = syn(&SYN_OPTIONS);
    let syn_with_toa = with_toa(&syn60);
    let segment = data_segment();
    let mut syn_ack = syn60.clone();
    syn_ack[33] = 0x12;

    // Sanity: both sides compute the same thing.
    let mut out = [0u8; 2048];
    assert_eq!(etherparse_find(&syn_with_toa), find(&syn_with_toa, &formats));
    assert!(find(&syn_with_toa, &formats).is_some());
    let n = etherparse_insert(&syn60, &mut out);
    assert_eq!(out[..n], syn_with_toa[..]);
    let n = etherparse_strip(&syn_with_toa, &mut out);
    assert_eq!(out[..n], syn60[..]);

    let mut group = c.benchmark_group("find");
    group.bench_function("toa-core", |b| b.iter(|| black_box(find(black_box(&syn_with_toa), &formats))));
    group.bench_function("etherparse", |b| b.iter(|| black_box(etherparse_find(black_box(&syn_with_toa)))));
    group.finish();

    let ins = |buf: &mut [u8], len| insert(buf, len, &toa, &formats).expect("room");
    edit_group(c, "insert-syn60", &syn60, ins, etherparse_insert);
    edit_group(c, "insert-1500", &segment, ins, etherparse_insert);
    let st = |buf: &mut [u8], len| strip(buf, len, &formats).expect("valid").len;
    edit_group(c, "strip", &syn_with_toa, st, etherparse_strip);
    let cl = |buf: &mut [u8], len| clamp_mss(buf, len, 8).expect("valid").map_or(0, |c| usize::from(c.new));
    edit_group(c, "clamp", &syn_ack, cl, etherparse_clamp);
}

criterion_group!(codec, benches);
criterion_main!(codec);
