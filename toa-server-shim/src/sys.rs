//! The syscalls libc has no safe wrapper for: TCP_SAVE_SYN and TCP_SAVED_SYN.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Asks the kernel to keep the SYN of every connection accepted on the
/// listening socket `fd` (Linux >= 4.2, unprivileged).
pub(crate) fn set_save_syn(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is a valid open socket for the borrow; the option value is a
    // live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVE_SYN,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Reads (and so releases) the saved SYN of the accepted socket `fd` into
/// `buf`: its IP and TCP headers. Returns 0 when none was saved (the listener
/// did not ask, SYN cookies were in use, or it was read already).
pub(crate) fn saved_syn(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `fd` is a valid open socket for the borrow; the kernel writes at
    // most `len` bytes into `buf`, which is valid for writes of that many, and
    // writes the used length back into `len`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(len as usize) } else { Err(io::Error::last_os_error()) }
}

/// The value layouts shared with `bpf/toa.bpf.c`.
pub(crate) mod bpf {
    /// `struct toa_peer`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct Peer {
        pub(crate) state: u8,
        pub(crate) source: u8,
        pub(crate) returned: u8,
        pub(crate) family: u8,
        pub(crate) segments: u8,
        pub(crate) pad: [u8; 1],
        pub(crate) port: u16,
        pub(crate) addr: [u32; 4],
        pub(crate) lb_addr: [u32; 4],
        pub(crate) lb_port: u16,
        pub(crate) pad2: u16,
    }

    /// `struct toa_config`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Config {
        pub(crate) enabled: u8,
        pub(crate) kinds: [u8; 5],
        pub(crate) trust_any: u8,
        pub(crate) pad: u8,
        pub(crate) kind_formats: [u8; 256],
    }

    impl Default for Config {
        fn default() -> Self {
            Config { enabled: 0, kinds: [0; 5], trust_any: 0, pad: 0, kind_formats: [0; 256] }
        }
    }

    /// `struct toa_meta`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Meta {
        pub(crate) cgroup: [u8; 256],
    }

    // SAFETY: plain `repr(C)` structs of integers and integer arrays, with the
    // padding spelt out as fields: every bit pattern is a valid value, and the
    // layouts match the C structs byte for byte (checked in ebpf.rs tests).
    unsafe impl aya::Pod for Peer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Meta {}
}
