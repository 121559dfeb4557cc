//! The control plane, the same for every datapath: [`ctl`] (the control
//! socket and its requests), [`metrics`] (Prometheus), [`health`] (backend
//! probes) and [`reload`] (SIGHUP and `ctl reload`); and the run's [`Stop`],
//! which they and the datapaths wait on.

pub mod ctl;
pub mod health;
pub mod metrics;
pub mod reload;
mod stop;

pub use stop::Stop;
