//! Health checks: TCP connect probes from the LB host to every backend.
//!
//! A backend is marked down after `fall` failed probes in a row (so within
//! `fall x interval`) and gets no new flow; its existing flows are kept. It
//! is marked up again after `rise` successes. Changes are logged and counted
//! (`health_changes`). UDP listeners are not probed (a connect probe says
//! nothing about a UDP service): their backends stay up.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::Stop;
use crate::datapath::Balancer;
use crate::engine::config::Protocol;

/// Probe settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between probes of a backend.
    pub interval: Duration,
    /// How long a connect may take.
    pub timeout: Duration,
    /// Successes in a row that bring a backend back.
    pub rise: u32,
    /// Failures in a row that take it out.
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck { interval: Duration::from_secs(2), timeout: Duration::from_secs(1), rise: 2, fall: 3 }
    }
}

/// Probes every backend of every TCP listener, once per interval, until
/// `stop` is set. The list and the settings are read each round, so backends
/// added or removed with `toa-lb ctl` and a reload are followed (`None`:
/// checks off, every backend up).
pub fn spawn(balancer: Arc<dyn Balancer>, settings: Arc<Mutex<Option<HealthCheck>>>, stop: Stop) {
    std::thread::spawn(move || {
        // (protocol, VIP, backend) -> (up, probes in a row that disagree with
        // `up`); keyed by VIP, not index, since a reload may reorder the listeners.
        let mut state: HashMap<(Protocol, SocketAddr, SocketAddr), (bool, u32)> = HashMap::new();
        while !stop.is_set() {
            let Some(check) = *settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) else {
                // Off: whatever the checks said before no longer holds.
                for ((protocol, vip, addr), _) in state.drain() {
                    balancer.set_backend_up((protocol, vip), addr, true);
                }
                // (A reload may turn them on: looked at again each second.)
                stop.sleep(Duration::from_secs(1));
                continue;
            };
            let targets: Vec<(Protocol, SocketAddr, SocketAddr)> = balancer
                .snapshot()
                .listeners
                .iter()
                .filter(|l| l.config.protocol == Protocol::Tcp)
                .flat_map(|l| l.backends.iter().map(|b| (l.config.protocol, l.config.vip, b.backend.addr)))
                .collect();
            state.retain(|key, _| targets.contains(key));
            // One probe thread per backend, so a slow one does not delay the others.
            let results: Vec<bool> = std::thread::scope(|scope| {
                let probes: Vec<_> = targets
                    .iter()
                    .map(|t| scope.spawn(move || TcpStream::connect_timeout(&t.2, check.timeout).is_ok()))
                    .collect();
                probes.into_iter().map(|p| p.join().unwrap_or(false)).collect()
            });
            for ((protocol, vip, addr), ok) in targets.into_iter().zip(results) {
                let (up, streak) = state.entry((protocol, vip, addr)).or_insert((true, 0));
                *streak = if ok != *up { *streak + 1 } else { 0 };
                let needed = if *up { check.fall } else { check.rise };
                if *streak >= needed {
                    *up = ok;
                    *streak = 0;
                    balancer.set_backend_up((protocol, vip), addr, ok);
                    if ok {
                        tracing::info!(%vip, backend = %addr, "backend up");
                    } else {
                        tracing::warn!(%vip, backend = %addr, "backend down: no new flows");
                    }
                }
            }
            stop.sleep(check.interval);
        }
    });
}
