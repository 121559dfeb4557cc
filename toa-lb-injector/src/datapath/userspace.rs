//! The user-space datapaths (ring, pnet) as a [`Balancer`]: engines that
//! hold the flows, the addresses `toa-lb` answers ARP and NDP for, and the
//! nftables fence that keeps the host's IP stack out.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::datapath::frames::{self, Owned};
use crate::datapath::shards::Shards;
use crate::datapath::{Balancer, Complaints, ControlError, ListenerView, Snapshot, fence};
use crate::engine::ListenerKey;
use crate::engine::config::{Backend, ObtainClientIp};
use crate::file::LbConfig;

/// The engines of a ring or pnet datapath, and what they answer for.
#[derive(Debug)]
pub struct UserspaceLb {
    shards: Arc<Shards>,
    owned: Owned,
    /// Client and backend interfaces.
    interfaces: [String; 2],
    /// Held while the fence changes (a reload, or putting it back), so that
    /// the last fence installed is for the last `owned`.
    fence: Mutex<FenceWatch>,
}

/// What the watch keeps of the fence.
#[derive(Debug, Default)]
struct FenceWatch {
    /// How many times it was put back.
    put_back: u64,
    complaints: Complaints,
}

impl UserspaceLb {
    /// Wraps running engines; `owned` is the set the frame handlers answer ARP for.
    pub fn new(shards: Arc<Shards>, owned: Owned, interfaces: [String; 2]) -> Self {
        UserspaceLb { shards, owned, interfaces, fence: Mutex::default() }
    }

    /// Puts the fence's tables back if someone else removed them (`nft flush
    /// ruleset`, a firewall service restarted): without them the host's own
    /// stack would answer the VIPs' and SNAT addresses' packets too. Called
    /// periodically; says what it did.
    pub fn keep_fence(&self) {
        // (Not the engines' lock: the workers would wait on this netlink request.)
        let mut watch = self.fence.lock().unwrap_or_else(PoisonError::into_inner);
        match fence::present() {
            Ok(true) => {}
            Ok(false) => {
                let owned: Vec<IpAddr> =
                    self.owned.read().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
                let interfaces = [self.interfaces[0].as_str(), self.interfaces[1].as_str()];
                match fence::install(&owned, &interfaces) {
                    Ok(()) => {
                        watch.put_back += 1;
                        tracing::warn!(
                            "the nftables tables inet and netdev {} were removed by someone else (nft flush ruleset? a firewall service restarted?): put back",
                            fence::TABLE
                        );
                    }
                    Err(e) => watch.complaints.error(format!("putting the nftables fence back: {e}")),
                }
            }
            Err(e) => watch.complaints.warn(format!("looking for the nftables fence: {e}")),
        }
    }
}

impl Balancer for UserspaceLb {
    fn snapshot(&self) -> Snapshot {
        // (Before the engines' lock: a reload takes the fence's, then theirs.)
        let put_back = self.fence.lock().unwrap_or_else(PoisonError::into_inner).put_back;
        let engines = self.shards.lock();
        let listeners = engines
            .listeners()
            .all()
            .iter()
            .enumerate()
            .map(|(i, l)| ListenerView::of(l, engines.counters(i).unwrap_or_default()))
            .collect();
        let d = engines.datapath();
        Snapshot {
            listeners,
            backends: engines.backend_counters(),
            flows: engines.flow_count(),
            datapath_drops: vec![
                ("truncated", d.truncated.load(Ordering::Relaxed)),
                ("vlan", d.vlan.load(Ordering::Relaxed)),
                ("tx_full", d.tx_dropped.load(Ordering::Relaxed)),
            ],
            unparsed: engines.unparsed(),
            put_back: vec![("table", put_back)],
        }
    }

    fn set_mode(&self, listener: usize, mode: ObtainClientIp) -> Result<(), ControlError> {
        Ok(self.shards.lock().apply(|e| e.set_obtain_client_ip(listener, mode))?)
    }

    fn add_backend(&self, listener: usize, backend: Backend) -> Result<(), ControlError> {
        Ok(self.shards.lock().apply(|e| e.add_backend(listener, backend))?)
    }

    fn remove_backend(&self, listener: usize, addr: SocketAddr) -> Result<(), ControlError> {
        Ok(self.shards.lock().apply(|e| e.remove_backend(listener, addr))?)
    }

    fn drain(&self, listener: usize, addr: SocketAddr, drain: bool) -> Result<(), ControlError> {
        Ok(self.shards.lock().apply(|e| e.drain_backend(listener, addr, drain))?)
    }

    fn set_backend_up(&self, listener: ListenerKey, addr: SocketAddr, up: bool) -> bool {
        let mut engines = self.shards.lock();
        let Some(index) = engines.listeners().find(listener) else { return false };
        let mut changed = false;
        engines.for_each(|e| changed |= e.set_backend_up(index, addr, up));
        changed
    }

    fn reconfigure(&self, config: &LbConfig) -> Result<Option<usize>, ControlError> {
        let datapath = |e: &dyn std::fmt::Display| ControlError::Datapath(e.to_string());
        let client = frames::interface(&config.client_interface).map_err(|e| datapath(&e))?;
        let vips: Vec<IpAddr> = config.engine.listeners.iter().map(|l| l.vip.ip()).collect();
        frames::check_vips(&client, &vips).map_err(|e| datapath(&e))?;
        let _fence = self.fence.lock().unwrap_or_else(PoisonError::into_inner);
        let mut engines = self.shards.lock();
        // Answer for the new VIPs and SNAT addresses, and for the SNAT addresses
        // flows still use; nftables first, so that a failure there changes nothing.
        let mut owned: HashSet<IpAddr> = vips.iter().chain(&config.engine.snat).copied().collect();
        owned.extend(engines.snat_in_use());
        let list: Vec<IpAddr> = owned.iter().copied().collect();
        let interfaces = [self.interfaces[0].as_str(), self.interfaces[1].as_str()];
        fence::install(&list, &interfaces).map_err(|e| datapath(&e))?;
        let flows_before = engines.flow_count();
        if let Err(e) = engines.apply(|e| e.reconfigure(config.engine.clone())) {
            // (The file was validated already: this is not expected.) Put the old rules back.
            let old: Vec<IpAddr> =
                self.owned.read().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
            if let Err(nft) = fence::install(&old, &interfaces) {
                tracing::error!("restoring the nftables rules after a failed reload: {nft}");
            }
            return Err(e.into());
        }
        let dropped = flows_before - engines.flow_count();
        drop(engines);
        *self.owned.write().unwrap_or_else(PoisonError::into_inner) = owned;
        Ok(Some(dropped))
    }
}
