//! The eBPF programs' TCP option parsers, compiled for the host from the same
//! C headers as the BPF objects, so that tests can check them against
//! `toa-core` on the same inputs:
//!
//! - [`find_toa`]: the kernel helper's search (`toa-server-shim/bpf/find_toa.h`);
//! - [`scan_options`], [`build_with_toa`], [`find_mss`], [`clamp_mss`]: the
//!   TOA injector's strip, insert and MSS logic (`toa-lb-injector/bpf/options.h`);
//! - [`find_uoa_option`], [`opp_header_len`]: the UOA parsers of the helper's
//!   UDP program and the injector (`toa-server-shim/bpf/find_uoa.h`).
//!
//! Every buffer handed to C is 64 bytes and zero padded past the options
//! area, as in the BPF programs. The tests are in `tests/parity.rs`.

mod sys;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest TCP options area.
pub const OPT_MAX: usize = 40;

/// The C functions' buffer: an options area of at most [`OPT_MAX`] bytes,
/// zero padded to 64.
fn buffer(area: &[u8]) -> [u8; 64] {
    assert!(area.len() <= OPT_MAX, "an options area is at most {OPT_MAX} bytes");
    let mut buf = [0u8; 64];
    buf[..area.len()].copy_from_slice(area);
    buf
}

/// What `find_toa` decided about an options area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A TOA: its address and port (0 for a format without one).
    Found(IpAddr, u16),
    /// No TOA of an enabled format.
    None,
    /// A malformed option before any TOA.
    Malformed,
}

/// The kernel helper's `find_toa` over `area` with its kind table
/// (`toa_server_shim::ebpf::kind_formats`).
pub fn find_toa(area: &[u8], kind_formats: &[u8; 256]) -> Verdict {
    let opts = buffer(area);
    let found = sys::find_toa(&opts, area.len(), kind_formats);
    match found.result {
        1 => {
            let port = u16::from_be_bytes(found.port.to_ne_bytes());
            let mut addr = [0u8; 16];
            for (chunk, word) in addr.chunks_mut(4).zip(found.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            let ip = match found.family {
                sys::AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
                _ => IpAddr::V6(Ipv6Addr::from(addr)),
            };
            Verdict::Found(ip, port)
        }
        0 => Verdict::None,
        _ => Verdict::Malformed,
    }
}

/// What `find_uoa_option` decided about an IPv4-format option list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UoaVerdict {
    /// A UOA naming this client.
    Found(std::net::SocketAddr),
    /// No UOA.
    None,
    /// A malformed list or UOA option.
    Malformed,
}

/// The helper's `find_uoa_option` over an IPv4-format option list.
pub fn find_uoa_option(area: &[u8]) -> UoaVerdict {
    let opts = buffer(area);
    let c = sys::find_uoa_option(&opts, area.len());
    match c.result {
        1 => {
            let mut addr = [0u8; 16];
            for (chunk, word) in addr.chunks_mut(4).zip(c.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            let ip = match c.family {
                sys::AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
                _ => IpAddr::V6(Ipv6Addr::from(addr)),
            };
            UoaVerdict::Found(std::net::SocketAddr::new(ip, u16::from_be_bytes(c.port.to_ne_bytes())))
        }
        0 => UoaVerdict::None,
        _ => UoaVerdict::Malformed,
    }
}

/// The C check of an opp header's fixed part: its length, or `None`.
pub fn opp_header_len(hdr: [u8; 4]) -> Option<usize> {
    usize::try_from(sys::opp_header_len(&hdr)).ok()
}

/// What `scan_options` did to an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The area after it (its length is unchanged).
    pub area: [u8; 64],
    /// TOA-format options overwritten with NOPs.
    pub stripped: usize,
    /// Whether an option overran the area (an EOL was written over it).
    pub malformed: bool,
}

/// The injector's `scan_options` over `area`, with its kind table
/// (`toa_lb_injector::datapath::kernel::injector::kind_formats`).
pub fn scan_options(area: &[u8], kind_formats: &[u8; 256]) -> Scan {
    let mut opts = buffer(area);
    let scan = sys::scan_options(&mut opts, area.len(), kind_formats);
    Scan { area: opts, stripped: usize::try_from(scan.stripped).unwrap_or(0), malformed: scan.malformed != 0 }
}

/// The injector's `build_with_toa`: the area with `option` first, or `None`
/// when it does not fit.
pub fn build_with_toa(area: &[u8], option: &[u8]) -> Option<Vec<u8>> {
    assert!((2..=20).contains(&option.len()), "a TOA option is 2 to 20 bytes");
    let old = buffer(area);
    let mut toa = [0u8; 64];
    toa[..option.len()].copy_from_slice(option);
    let mut out = [0u8; 64];
    let len = sys::build_with_toa(&old, area.len(), &toa, option.len(), &mut out);
    usize::try_from(len).ok().map(|len| out[..len].to_vec())
}

/// The injector's `find_mss`: the MSS value's offset in a well-formed area.
pub fn find_mss(area: &[u8]) -> Option<usize> {
    let opts = buffer(area);
    usize::try_from(sys::find_mss(&opts, area.len())).ok()
}

/// The injector's `clamp_mss` at `at` (from [`find_mss`]) by `by`; returns
/// the area after it and whether it changed.
pub fn clamp_mss(area: &[u8], at: usize, by: u16) -> (Vec<u8>, bool) {
    let mut opts = buffer(area);
    let changed = sys::clamp_mss(&mut opts, at, by);
    (opts[..area.len()].to_vec(), changed)
}
