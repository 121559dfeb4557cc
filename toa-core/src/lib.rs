//! `toa-core`: a `no_std`, sans-IO codec for TOA (TCP Option Address).
//!
//! Layer-4 load balancers in FULLNAT mode (Huawei ELB, LVS/DPVS, Alibaba,
//! Tencent) connect to backends from their own addresses, so a backend's
//! `accept()` sees the balancer, not the client. With "Obtain Client IP
//! Address" on, the balancer writes the client's address into a TCP option on
//! the connection's first segments. This crate reads and writes that option in
//! every vendor format ([`Format`]), in whole IPv4 and IPv6 packets:
//!
//! - [`TcpPacket`] and [`TcpHeader`]: checked zero-copy views; [`Options`]
//!   walks options and reports every malformed case as an [`Error`] with its
//!   offset.
//! - [`Toa`]: the decoded option, with [`Toa::emit`].
//! - [`insert`], [`strip`], [`clamp_mss`], [`rewrite_endpoints`]: edits in
//!   the caller's buffer with lengths and checksums fixed incrementally
//!   ([`checksum`]).
//!
//! It never allocates, opens a socket or reads a clock, and never panics on
//! input: every function that takes packet bytes returns a typed error.
//!
//! ```
//! use toa_core::{insert, strip, Format, Formats, TcpPacket, Toa};
//!
//! // A 40-byte IPv4 SYN from the balancer (100.125.0.1) to a backend (10.0.0.2).
//! let syn = [
//!     0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0xcc, 0x50, 100, 125, 0, 1, 10, 0, 0, 2,
//!     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0xa4, 0xd1, 0, 0,
//! ];
//! assert!(TcpPacket::new_checked(&syn[..]).unwrap().checksums_valid());
//! let mut buf = [0u8; 64];
//! buf[..40].copy_from_slice(&syn);
//!
//! let formats = Formats::default(); // toa + toa6
//! let client = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
//! let len = insert(&mut buf, 40, &client, &formats).unwrap();
//!
//! let packet = TcpPacket::new_checked(&buf[..len]).unwrap();
//! assert!(packet.checksums_valid());
//! let found = packet.toa(&formats).unwrap().expect("a toa");
//! assert_eq!(found.toa.socket_addr(), Some("203.0.113.7:40000".parse().unwrap()));
//!
//! // Stripping restores the original bytes.
//! let stripped = strip(&mut buf, len, &formats).unwrap();
//! assert_eq!(buf[..stripped.len], syn);
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod checksum;
mod edit;
mod error;
mod format;
mod mss;
mod nat;
mod option;
mod packet;
mod udp;
pub mod uoa;

pub use edit::{Stripped, insert, strip};
pub use error::{Error, Layer};
pub use format::{Format, Formats, UnknownFormat};
pub use mss::{MIN_MSS, MssClamp, clamp_mss};
pub use nat::rewrite_endpoints;
pub use option::{Options, RawOption, TencentMeta, Toa, ToaOption, Toas, kind};
pub use packet::{IpVersion, TcpFlags, TcpHeader, TcpPacket};
pub use udp::UdpPacket;
