//! Socket options without a safe wrapper in libc, nix or socket2.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets the IPv4 options of every datagram the socket sends (`IP_OPTIONS`;
/// an unknown option such as UOA's needs CAP_NET_RAW). Empty clears them.
pub fn set_ip_options(socket: BorrowedFd<'_>, options: &[u8]) -> io::Result<()> {
    // SAFETY: a valid socket for the borrow; `options` is live for the call
    // and its exact length is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
