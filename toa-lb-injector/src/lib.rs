//! The load-balancer side of TOA: `toa-lb`, a FULLNAT L4 load balancer that
//! writes the client's address into a TOA option, as Huawei ELB, LVS and
//! DPVS do, and `toa-lb inject`, the TOA injector alone for a NAT someone
//! else runs.
//!
//! - [`engine`]: the sans-IO FULLNAT + TOA engine, its configuration,
//!   listeners and counters. It never opens a socket or reads a clock, and
//!   is the reference for every datapath.
//! - [`datapath`]: what moves the packets. [`datapath::kernel`] (the
//!   default) lets the kernel forward with nftables and adds the TOA with a
//!   tc-BPF program; [`datapath::ring`] and [`datapath::pnet`] run the
//!   engine in user space. All of them are driven through one interface,
//!   [`datapath::Balancer`].
//! - [`control`]: the control socket (`toa-lb ctl`), Prometheus metrics,
//!   health checks and reload, the same for every datapath.
//! - [`mod@file`]: the TOML configuration; [`inject`]: `toa-lb inject`.
// Unsafe code only in `sys` (AF_PACKET rings, batch sends, ethtool ioctls).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod daemon;
pub mod datapath;
pub mod engine;
pub mod file;
pub mod inject;
mod nfnetlink;
mod nft;
mod sys;

pub use engine::config::{
    Backend, ConfigError, EngineConfig, ListenerConfig, MssClamp, ObtainClientIp, Placement, Protocol,
    Scheduler, Shard, Timeouts,
};
pub use engine::{BackendCounters, Counters, DropReason, Engine, ListenerKey, Verdict};
