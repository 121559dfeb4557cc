//! The load-balancer side of TOA: a sans-IO FULLNAT engine that writes the
//! client's address into a TOA option, as Huawei ELB, LVS and DPVS do.
//!
//! [`Engine::handle_packet`] takes one IP packet in the caller's buffer (from
//! a client to a VIP, or from a backend to an SNAT address), rewrites it in
//! place and says where it goes ([`Verdict`]). It never opens a socket or
//! reads a clock: the driver passes the time, so every decision is testable
//! without root, and any datapath (AF_PACKET, AF_XDP, ...) can drive it.
//!
//! Per packet from a client: strip every TOA-format option the client sent
//! (forgery, in every mode), pick or find the flow, rewrite client -> VIP into
//! SNAT -> backend, and insert the TOA where the listener's [`Placement`]
//! says. From a backend: rewrite back, and lower the MSS of the SYN-ACK by the
//! option's size so that clients never send segments that stop fitting. UDP
//! listeners get the same FULLNAT (or transparent DNAT) per client address
//! and port, without TOA.
//!
//! Around the engine: [`shards::Shards`] (one engine per datapath worker,
//! one view for the control plane), the drivers ([`ring`], the default, and
//! the [`datapath`] pnet fallback), [`ctl`] (control socket, metrics),
//! [`health`], [`nft`] and [`file`] (the TOML configuration) for `toa-lb`.
// Unsafe code only in `sys` (the AF_PACKET ring and batch system calls).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
pub mod ctl;
pub mod datapath;
mod engine;
pub mod file;
mod flow;
pub mod health;
pub mod nft;
pub mod ring;
mod schedule;
pub mod shards;
mod sys;

pub use config::{
    Backend, ConfigError, EngineConfig, ListenerConfig, ObtainClientIp, Placement, Protocol, Scheduler,
    Shard, Timeouts,
};
pub use engine::{BackendCounters, Counters, DropReason, Engine, ListenerKey, Verdict};
