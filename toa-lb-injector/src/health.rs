//! Health checks: TCP connect probes from the LB host to every backend.
//!
//! A backend is marked down after `fall` failed probes in a row (so within
//! `fall x interval`) and gets no new flow; its existing flows are kept. It
//! is marked up again after `rise` successes. Changes are logged and counted
//! (`health_changes`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::Engine;

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

/// Probes every backend of every listener, once per interval, until `stop`
/// is set. The list is read from the engine each round, so backends added or
/// removed with `toa-lb ctl` are followed.
pub fn spawn(engine: Arc<Mutex<Engine>>, check: HealthCheck, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        // (listener, backend) -> (up, probes in a row that disagree with `up`)
        let mut state: HashMap<(usize, SocketAddr), (bool, u32)> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let targets: Vec<(usize, SocketAddr, SocketAddr)> = match engine.lock() {
                Ok(e) => e
                    .listeners()
                    .iter()
                    .enumerate()
                    .flat_map(|(l, listener)| {
                        listener.backends.iter().map(move |b| (l, listener.vip, b.addr))
                    })
                    .collect(),
                Err(_) => return,
            };
            state.retain(|key, _| targets.iter().any(|t| (t.0, t.2) == *key));
            // One probe thread per backend, so a slow one does not delay the others.
            let results: Vec<bool> = std::thread::scope(|scope| {
                let probes: Vec<_> = targets
                    .iter()
                    .map(|t| scope.spawn(move || TcpStream::connect_timeout(&t.2, check.timeout).is_ok()))
                    .collect();
                probes.into_iter().map(|p| p.join().unwrap_or(false)).collect()
            });
            for ((listener, vip, addr), ok) in targets.into_iter().zip(results) {
                let (up, streak) = state.entry((listener, addr)).or_insert((true, 0));
                *streak = if ok != *up { *streak + 1 } else { 0 };
                let needed = if *up { check.fall } else { check.rise };
                if *streak >= needed {
                    *up = ok;
                    *streak = 0;
                    if let Ok(mut e) = engine.lock() {
                        e.set_backend_up(listener, addr, ok);
                    }
                    if ok {
                        tracing::info!(%vip, backend = %addr, "backend up");
                    } else {
                        tracing::warn!(%vip, backend = %addr, "backend down: no new flows");
                    }
                }
            }
            std::thread::sleep(check.interval);
        }
    });
}
