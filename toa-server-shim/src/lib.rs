//! `toa-server-shim`: the backend side of TOA.
//!
//! A FULLNAT load balancer connects to a backend from its own address; with
//! "Obtain Client IP" on, it writes the client's address into a TCP option
//! (TOA). This crate recovers that address on the backend, and only from
//! load balancers the operator trusts ([`trust`]).
//!
//! - [`ToaListener`] (std), [`tokio::ToaListener`] (feature `tokio`, and
//!   `axum::serve::Listener` with feature `axum`): `accept()` returns the
//!   stream and a [`PeerInfo`] `{ client, lb, source }`. They read the TOA from
//!   the connection's SYN (`TCP_SAVED_SYN`): unprivileged, any kernel since 4.2.
//! - [`TrustPolicy`]: the load balancers allowed to speak for a client. There
//!   is no default; trusting anyone must be asked for ([`TrustPolicy::any`]).
//! - The operator tool `toa-shim inspect`, which decodes the TOA in packets
//!   from a hex string, a pcap/pcapng file or a live interface (`inspect`,
//!   `capture`, feature `inspect`).
//!
//! ```no_run
//! use std::io::Write;
//! use toa_server_shim::{Config, ToaListener, TrustPolicy};
//!
//! let listener = ToaListener::bind("0.0.0.0:8080", Config::new(TrustPolicy::new("huawei-elb".parse()?)?))?;
//! let (mut stream, peer) = listener.accept()?;
//! writeln!(stream, "hello {}", peer.client)?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! The default, `cli`, builds the `toa-shim` binary and everything it needs.
//! A library user who only wants the listeners turns it off, so that no BPF
//! loader, argument parser or capture code is compiled:
//!
//! ```toml
//! toa-server-shim = { version = "0.1", default-features = false, features = ["tokio"] }
//! ```
//!
//! - `tokio`, `axum`: the tokio listener, and its `axum::serve::Listener`;
//! - `ebpf`: [`ebpf`], loading and attaching the kernel helper (aya). The
//!   listeners read the helper's record without it;
//! - `inspect`: [`inspect`] and [`capture`], decoding TOAs in pcap files and
//!   live traffic;
//! - `cli` (default): `ebpf`, `inspect` and the `toa-shim` binary.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "inspect")]
pub mod capture;
#[cfg(feature = "ebpf")]
pub mod ebpf;
mod helper;
#[cfg(feature = "inspect")]
pub mod inspect;
mod listener;
mod peer;
pub mod proxy;
mod sys;
pub mod tap;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod trust;
pub mod uoa;
pub mod xff;

pub use listener::{Config, Mode, Pending, TcpListenerExt, ToaListener};
pub use peer::{PeerInfo, Source, StatsSnapshot};
pub use proxy::{ProxyHeader, ProxyProtocol};
pub use trust::{NoTrustConfigured, TrustPolicy, TrustedSources};
