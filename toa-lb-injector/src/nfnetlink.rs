//! Netlink to netfilter (`NETLINK_NETFILTER`): the socket, the requests and
//! the fields of answers, shared by the conntrack reader
//! ([`crate::datapath::kernel::conntrack`]) and the nf_tables table check
//! ([`crate::nft::table_exists`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};

pub(crate) const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLM_F_ACK: u16 = 4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

/// A netlink socket to netfilter of this network namespace.
pub(crate) fn socket() -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

/// The start of a request: the netlink header (its length written by
/// [`finish`]), `kind` (`subsystem << 8 | message`), `flags`, `seq`, the
/// kernel's port, then the nfgenmsg of `family` (version 0, resource 0).
pub(crate) fn request(kind: u16, flags: u16, seq: u32, family: u8) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in by finish
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[family, 0, 0, 0]);
    msg
}

/// Appends an attribute: its length (header and `value`, unpadded), its
/// type, `value`, padding to 4 bytes.
pub(crate) fn attribute(msg: &mut Vec<u8>, kind: u16, value: &[u8]) {
    msg.extend_from_slice(&u16::try_from(4 + value.len()).unwrap_or(u16::MAX).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(value);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// Writes the message's length into its header.
pub(crate) fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// An answer message of `kind` with `body` (what the kernel would send), for tests.
#[cfg(test)]
pub(crate) fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&[0; 10]);
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_a_padded_attribute() {
        let mut msg = request(10 << 8 | 1, NLM_F_REQUEST | NLM_F_ACK, 7, 1);
        attribute(&mut msg, 1, b"abc\0\x01");
        let msg = finish(msg);
        assert_eq!(msg.len(), 16 + 4 + 12);
        assert_eq!(u32_at(&msg, 0), Some(32));
        assert_eq!(
            (u16_at(&msg, 4), u16_at(&msg, 6), u32_at(&msg, 8)),
            (Some(10 << 8 | 1), Some(5), Some(7))
        );
        assert_eq!(&msg[16..20], &[1, 0, 0, 0], "nfgenmsg");
        assert_eq!((u16_at(&msg, 20), u16_at(&msg, 22)), (Some(9), Some(1)), "length unpadded");
        assert_eq!(&msg[24..32], b"abc\0\x01\0\0\0");
        assert_eq!((u16_at(&msg, 31), u32_at(&msg, 30)), (None, None), "past the end");
    }
}
