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
