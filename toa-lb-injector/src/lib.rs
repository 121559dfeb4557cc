//! The load-balancer side of TOA.
//!
//! Not built yet: this crate will hold the sans-IO injection engine and
//! `toa-lb`, a FULLNAT L4 load balancer (see the project's LB issues). Until
//! then, a balancer written elsewhere can use [`toa_core::insert`],
//! [`toa_core::strip`] and [`toa_core::clamp_mss`] directly; they are the
//! per-packet operations the engine will be built on.
#![no_std]
#![forbid(unsafe_code)]
