//! Examples for the toa toolkit, and the sample captures under `captures/`.
//!
//! The captures are made here, by the project's own code (etherparse builds
//! the packets, `toa-core` inserts the options), so they can be regenerated
//! byte for byte: `cargo run -p toa-examples --bin toa-captures`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod captures;
pub mod whoami;
