//! `toa-server-shim`: the backend side of TOA.
//!
//! A FULLNAT load balancer connects to a backend from its own address; with
//! "Obtain Client IP" on, it writes the client's address into a TCP option
//! (TOA). This crate recovers that address on the backend, and only from
//! load balancers the operator trusts ([`trust`]).
//!
//! Today it holds the operator's first tool, `toa-shim inspect`, which decodes
//! the TOA in packets from a hex string, a pcap/pcapng file or a live
//! interface ([`inspect`], [`capture`]), so an operator can see whether and
//! how the load balancer sends it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod capture;
pub mod inspect;
pub mod trust;
