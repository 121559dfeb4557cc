//! The listeners as they run: each one's configuration (with its current
//! mode and backends) and its backends' health and drain state. The engine
//! and the kernel datapath both keep one, so that a live change or a reload
//! means the same on every datapath.

use std::net::{IpAddr, SocketAddr};

use crate::engine::config::{Backend, ConfigError, ListenerConfig, ObtainClientIp, Protocol};
use crate::engine::counters::ListenerKey;

/// Why a backend change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No listener at that index.
    #[error("no such listener")]
    NoListener,
    /// Weight 0.
    #[error("weight must be at least 1")]
    ZeroWeight,
    /// Not of the VIP's IP version.
    #[error("{0} is not of the VIP's IP version")]
    Family(SocketAddr),
    /// No SNAT address of its IP version.
    #[error("no SNAT address of {0}'s IP version")]
    NoSnat(SocketAddr),
    /// Already a backend of the listener.
    #[error("{0} is already a backend")]
    Duplicate(SocketAddr),
    /// Not a backend of the listener.
    #[error("{0} is not a backend")]
    Unknown(SocketAddr),
    /// The last backend of a listener.
    #[error("cannot remove the last backend (drain it, or add another first)")]
    Last,
}

/// One listener and the state of its backends.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Its configuration, with the current mode and backends.
    pub config: ListenerConfig,
    /// Per backend (the configuration's order): whether health checks say it is up.
    up: Vec<bool>,
    /// Backends draining: no new flows.
    draining: Vec<SocketAddr>,
}

impl Listener {
    fn new(config: ListenerConfig) -> Self {
        let up = vec![true; config.backends.len()];
        Listener { config, up, draining: Vec::new() }
    }

    /// Its identity across reloads.
    pub fn key(&self) -> ListenerKey {
        (self.config.protocol, self.config.vip)
    }

    /// Whether backend `index` may get new flows: up and not draining.
    pub fn eligible(&self, index: usize) -> bool {
        self.up.get(index).copied().unwrap_or(false)
            && !self.draining.contains(&self.config.backends[index].addr)
    }

    /// Whether backend `index` is up (health checks).
    pub fn up(&self, index: usize) -> Option<bool> {
        self.up.get(index).copied()
    }

    /// Whether the backend at `addr` is draining.
    pub fn draining(&self, addr: SocketAddr) -> bool {
        self.draining.contains(&addr)
    }
}

/// The listeners, in configuration order.
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    all: Vec<Listener>,
}

impl Listeners {
    /// Listeners for a validated configuration: every backend up, none draining.
    pub fn new(configs: &[ListenerConfig]) -> Self {
        Listeners { all: configs.iter().cloned().map(Listener::new).collect() }
    }

    /// Every listener.
    pub fn all(&self) -> &[Listener] {
        &self.all
    }

    /// Listener `index`.
    pub fn get(&self, index: usize) -> Option<&Listener> {
        self.all.get(index)
    }

    /// The index of the listener with this key.
    pub fn find(&self, key: ListenerKey) -> Option<usize> {
        self.all.iter().position(|l| l.key() == key)
    }

    /// The listener for a packet to `vip` of protocol `proto`.
    pub fn for_packet(&self, proto: Protocol, vip: SocketAddr) -> Option<usize> {
        self.all.iter().position(|l| l.config.vip == vip && l.config.protocol == proto)
    }

    /// The configurations, in order.
    pub fn configs(&self) -> impl Iterator<Item = &ListenerConfig> {
        self.all.iter().map(|l| &l.config)
    }

    /// Takes a new (validated) configuration. Listeners are matched by
    /// protocol and VIP: a backend that stays keeps its health and drain
    /// state. Returns, for each old listener, its new index (`None`: gone).
    pub fn reconfigure(&mut self, configs: &[ListenerConfig]) -> Vec<Option<usize>> {
        let map: Vec<Option<usize>> = self
            .all
            .iter()
            .map(|old| configs.iter().position(|c| (c.protocol, c.vip) == old.key()))
            .collect();
        let all = configs
            .iter()
            .enumerate()
            .map(|(new, config)| {
                let mut listener = Listener::new(config.clone());
                if let Some(old) = map.iter().position(|m| *m == Some(new)).map(|i| &self.all[i]) {
                    for (i, backend) in config.backends.iter().enumerate() {
                        if let Some(was) = old.config.backends.iter().position(|b| b.addr == backend.addr) {
                            listener.up[i] = old.up[was];
                        }
                    }
                    listener.draining = old
                        .draining
                        .iter()
                        .copied()
                        .filter(|a| config.backends.iter().any(|b| b.addr == *a))
                        .collect();
                }
                listener
            })
            .collect();
        self.all = all;
        map
    }

    /// Switches listener `index`'s mode for new flows. TOA is for TCP
    /// listeners, UOA for UDP ones.
    pub fn set_mode(&mut self, index: usize, mode: ObtainClientIp) -> Result<(), ConfigError> {
        let listener = self.all.get_mut(index).ok_or(ConfigError::Limits("no such listener"))?;
        if !mode.fits(listener.config.protocol) {
            return Err(ConfigError::ToaOnUdp(listener.config.vip));
        }
        listener.config.obtain_client_ip = mode;
        Ok(())
    }

    /// Adds a backend to listener `index` (`snat`: the pool, which must hold
    /// an address of its family).
    pub fn add_backend(
        &mut self,
        index: usize,
        backend: Backend,
        snat: &[IpAddr],
    ) -> Result<(), BackendError> {
        let listener = self.all.get_mut(index).ok_or(BackendError::NoListener)?;
        if backend.weight == 0 {
            return Err(BackendError::ZeroWeight);
        }
        if backend.addr.is_ipv4() != listener.config.vip.is_ipv4() {
            return Err(BackendError::Family(backend.addr));
        }
        if !snat.iter().any(|a| a.is_ipv4() == backend.addr.is_ipv4()) {
            return Err(BackendError::NoSnat(backend.addr));
        }
        if listener.config.backends.iter().any(|b| b.addr == backend.addr) {
            return Err(BackendError::Duplicate(backend.addr));
        }
        listener.config.backends.push(backend);
        listener.up.push(true);
        Ok(())
    }

    /// Removes a backend; returns its index before the removal. The last
    /// backend cannot be removed.
    pub fn remove_backend(&mut self, index: usize, addr: SocketAddr) -> Result<usize, BackendError> {
        let listener = self.all.get_mut(index).ok_or(BackendError::NoListener)?;
        let i = listener
            .config
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or(BackendError::Unknown(addr))?;
        if listener.config.backends.len() == 1 {
            return Err(BackendError::Last);
        }
        listener.config.backends.remove(i);
        listener.up.remove(i);
        listener.draining.retain(|a| *a != addr);
        Ok(i)
    }

    /// Drains a backend (no new flows) or undrains it.
    pub fn drain(&mut self, index: usize, addr: SocketAddr, drain: bool) -> Result<(), BackendError> {
        let listener = self.all.get_mut(index).ok_or(BackendError::NoListener)?;
        if !listener.config.backends.iter().any(|b| b.addr == addr) {
            return Err(BackendError::Unknown(addr));
        }
        listener.draining.retain(|a| *a != addr);
        if drain {
            listener.draining.push(addr);
        }
        Ok(())
    }

    /// Marks a backend up or down; returns whether that changed anything.
    pub fn set_up(&mut self, index: usize, addr: SocketAddr, up: bool) -> bool {
        let Some(listener) = self.all.get_mut(index) else { return false };
        let Some(i) = listener.config.backends.iter().position(|b| b.addr == addr) else { return false };
        std::mem::replace(&mut listener.up[i], up) != up
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{Placement, Scheduler};

    fn listener(vip: &str, backends: &[&str]) -> ListenerConfig {
        ListenerConfig {
            vip: vip.parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: backends.iter().map(|b| Backend { addr: b.parse().unwrap(), weight: 1 }).collect(),
            scheduler: Scheduler::RoundRobin,
            obtain_client_ip: ObtainClientIp::Off,
            placement: Placement::default(),
            mss_clamp: Default::default(),
        }
    }

    #[test]
    fn reconfigure_keeps_state_of_what_stays() {
        let a = listener("203.0.113.10:80", &["100.125.2.1:80", "100.125.2.2:80"]);
        let b = listener("203.0.113.10:81", &["100.125.2.1:81"]);
        let mut l = Listeners::new(&[a.clone(), b.clone()]);
        let be2: SocketAddr = "100.125.2.2:80".parse().unwrap();
        assert!(l.set_up(0, be2, false));
        assert!(!l.set_up(0, be2, false), "no change the second time");
        l.drain(0, "100.125.2.1:80".parse().unwrap(), true).unwrap();
        // b goes, a moves to index 1 behind a new listener, and loses one backend.
        let c = listener("203.0.113.11:80", &["100.125.2.3:80"]);
        let a2 = listener("203.0.113.10:80", &["100.125.2.2:80"]);
        assert_eq!(l.reconfigure(&[c, a2]), vec![Some(1), None]);
        let a = l.get(1).unwrap();
        assert_eq!((a.up(0), a.eligible(0)), (Some(false), false), "be2 stays down");
        assert!(!a.draining("100.125.2.1:80".parse().unwrap()), "a removed backend's drain is gone");
        assert!(l.get(0).unwrap().eligible(0));
    }

    #[test]
    fn backend_changes_are_checked() {
        let mut l = Listeners::new(&[listener("203.0.113.10:80", &["100.125.2.1:80"])]);
        let snat: Vec<IpAddr> = vec!["100.125.1.1".parse().unwrap()];
        let b = |a: &str, weight| Backend { addr: a.parse().unwrap(), weight };
        assert_eq!(l.add_backend(0, b("100.125.2.2:80", 0), &snat), Err(BackendError::ZeroWeight));
        assert!(matches!(l.add_backend(0, b("[2001:db8::1]:80", 1), &snat), Err(BackendError::Family(_))));
        assert!(matches!(l.add_backend(0, b("100.125.2.1:80", 1), &snat), Err(BackendError::Duplicate(_))));
        assert_eq!(l.add_backend(3, b("100.125.2.2:80", 1), &snat), Err(BackendError::NoListener));
        l.add_backend(0, b("100.125.2.2:80", 1), &snat).unwrap();
        assert_eq!(l.remove_backend(0, "100.125.2.1:80".parse().unwrap()), Ok(0));
        assert_eq!(l.remove_backend(0, "100.125.2.2:80".parse().unwrap()), Err(BackendError::Last));
        assert!(l.set_mode(0, ObtainClientIp::Transparent).is_ok());
    }
}
