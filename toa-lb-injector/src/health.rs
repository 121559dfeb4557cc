//! Health checks: TCP connect probes from the LB host to every backend.
//!
//! A backend is marked down after `fall` failed probes in a row (so within
//! `fall x interval`) and gets no new flow; its existing flows are kept. It
//! is marked up again after `rise` successes. Changes are logged and counted
//! (`health_changes`).

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

/// Probes every backend of every listener on a thread of its own until `stop` is set.
pub fn spawn(engine: Arc<Mutex<Engine>>, check: HealthCheck, stop: Arc<AtomicBool>) {
    let targets: Vec<(usize, usize, SocketAddr, SocketAddr)> = match engine.lock() {
        Ok(e) => e
            .listeners()
            .iter()
            .enumerate()
            .flat_map(|(l, listener)| {
                listener
                    .backends
                    .iter()
                    .enumerate()
                    .map(move |(b, backend)| (l, b, listener.vip, backend.addr))
            })
            .collect(),
        Err(_) => return,
    };
    for (listener, backend, vip, addr) in targets {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut up, mut streak) = (true, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let ok = TcpStream::connect_timeout(&addr, check.timeout).is_ok();
                // `streak` counts probes that disagree with the current state.
                streak = if ok != up { streak + 1 } else { 0 };
                let needed = if up { check.fall } else { check.rise };
                if streak >= needed {
                    up = ok;
                    streak = 0;
                    if let Ok(mut e) = engine.lock() {
                        e.set_backend_up(listener, backend, up);
                    }
                    if up {
                        tracing::info!(%vip, backend = %addr, "backend up");
                    } else {
                        tracing::warn!(%vip, backend = %addr, "backend down: no new flows");
                    }
                }
                std::thread::sleep(check.interval);
            }
        });
    }
}
