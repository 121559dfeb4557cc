//! The C functions (built by build.rs from the BPF headers) and their
//! structures, mirrored field by field.
#![allow(unsafe_code)]

use std::ffi::c_int;

pub(crate) const AF_INET: u8 = 2;

/// `struct found` (find_toa.h).
#[repr(C)]
#[derive(Default)]
pub(crate) struct Found {
    pub(crate) result: c_int,
    pub(crate) family: u8,
    /// Network order, as on the wire (`to_ne_bytes` gives the wire bytes).
    pub(crate) port: u16,
    /// Network order; IPv4 in the first word.
    pub(crate) addr: [u32; 4],
}

/// `struct scan` (options.h).
#[repr(C)]
#[derive(Default)]
pub(crate) struct Scan {
    pub(crate) stripped: c_int,
    pub(crate) malformed: c_int,
}

/// `struct uoa_client` (find_uoa.h).
#[repr(C)]
#[derive(Default)]
pub(crate) struct UoaClient {
    /// Network order; IPv4 in the first word.
    pub(crate) addr: [u32; 4],
    /// Network order.
    pub(crate) port: u16,
    pub(crate) family: u8,
    /// 1 found, 0 none, -1 malformed.
    pub(crate) result: i8,
}

unsafe extern "C" {
    fn parity_find_uoa_option(opts: *const u8, len: c_int, out: *mut UoaClient);
    fn parity_opp_header_len(hdr: *const u8) -> c_int;
    fn parity_find_toa(opts: *const u8, len: c_int, kind_formats: *const u8, out: *mut Found);
    fn parity_scan_options(opts: *mut u8, len: c_int, kind_formats: *const u8, out: *mut Scan);
    fn parity_build_with_toa(
        old: *const u8,
        old_len: c_int,
        toa: *const u8,
        toa_len: c_int,
        out: *mut u8,
    ) -> c_int;
    fn parity_find_mss(opts: *const u8, len: c_int) -> c_int;
    fn parity_clamp_mss(opts: *mut u8, at: c_int, by: c_int) -> c_int;
}

/// `len` must be at most 40 (callers check): the C code reads up to
/// `len + 40` masked by 63, inside the 64-byte buffer.
fn c_len(len: usize) -> c_int {
    assert!(len <= 40);
    len as c_int
}

pub(crate) fn find_toa(opts: &[u8; 64], len: usize, kind_formats: &[u8; 256]) -> Found {
    let mut out = Found::default();
    // SAFETY: opts is 64 bytes and every index the C code reads is masked
    // with 63; kind_formats is 256 bytes, indexed by a byte; out is a live
    // struct with the C layout (repr(C), same field types and order).
    unsafe { parity_find_toa(opts.as_ptr(), c_len(len), kind_formats.as_ptr(), &mut out) };
    out
}

pub(crate) fn scan_options(opts: &mut [u8; 64], len: usize, kind_formats: &[u8; 256]) -> Scan {
    let mut out = Scan::default();
    // SAFETY: as find_toa; the C code writes only inside opts (indexes < 40
    // or masked with 63) and into out.
    unsafe { parity_scan_options(opts.as_mut_ptr(), c_len(len), kind_formats.as_ptr(), &mut out) };
    out
}

pub(crate) fn build_with_toa(
    old: &[u8; 64],
    old_len: usize,
    toa: &[u8; 64],
    toa_len: usize,
    out: &mut [u8; 64],
) -> c_int {
    // SAFETY: all three buffers are 64 bytes; the C code reads 20 bytes of
    // toa and indexes old and out masked with 63.
    unsafe {
        parity_build_with_toa(old.as_ptr(), c_len(old_len), toa.as_ptr(), c_len(toa_len), out.as_mut_ptr())
    }
}

pub(crate) fn find_mss(opts: &[u8; 64], len: usize) -> c_int {
    // SAFETY: opts is 64 bytes and every index read is masked with 63.
    unsafe { parity_find_mss(opts.as_ptr(), c_len(len)) }
}

pub(crate) fn clamp_mss(opts: &mut [u8; 64], at: usize, by: u16) -> bool {
    let at = c_int::try_from(at).unwrap_or(c_int::MAX);
    // SAFETY: opts is 64 bytes; the C code returns before touching it unless
    // 2 <= at <= 38, and then writes opts[at] and opts[at + 1] (masked).
    unsafe { parity_clamp_mss(opts.as_mut_ptr(), at, c_int::from(by)) != 0 }
}

pub(crate) fn find_uoa_option(opts: &[u8; 64], len: usize) -> UoaClient {
    let mut out = UoaClient::default();
    // SAFETY: opts is 64 bytes and every index the C code reads is masked
    // with 63; out is a live struct with the C layout.
    unsafe { parity_find_uoa_option(opts.as_ptr(), c_len(len), &mut out) };
    out
}

pub(crate) fn opp_header_len(hdr: &[u8; 4]) -> c_int {
    // SAFETY: the C code reads hdr[0..4], which is 4 live bytes.
    unsafe { parity_opp_header_len(hdr.as_ptr()) }
}
