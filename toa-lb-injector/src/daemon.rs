//! `toa-lb run`: start the datapath the configuration names, serve the
//! control socket, metrics and health checks, reload on SIGHUP, and on
//! SIGINT or SIGTERM remove everything the run put in place.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::control::reload::Reloader;
use crate::control::{Stop, ctl, health, metrics};
use crate::datapath::kernel::KernelLb;
use crate::datapath::kernel::host::Host;
use crate::datapath::shards::Shards;
use crate::datapath::userspace::UserspaceLb;
use crate::datapath::{Balancer, fence, frames, offload};
use crate::file::{Datapath, LbConfig};

/// Why `toa-lb run` stopped with an error: one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(String);

fn fail(e: impl std::fmt::Display) -> DaemonError {
    DaemonError(e.to_string())
}

/// The datapath a run started, and how to stop it.
enum Running {
    Kernel(Arc<KernelLb>),
    Userspace {
        shards: Arc<Shards>,
        owned: frames::Owned,
        lb: Arc<UserspaceLb>,
        /// The network namespace's lock (the kernel datapath's too): no
        /// second toa-lb here. Given back at exit.
        lock: Host,
    },
}

impl Running {
    /// What puts the datapath's nftables tables (and the kernel datapath's
    /// addresses) back if someone else removed them.
    fn keeper(&self) -> Box<dyn Fn() + Send> {
        match self {
            Running::Kernel(lb) => {
                let lb = lb.clone();
                Box::new(move || lb.keep())
            }
            Running::Userspace { lb, .. } => {
                let lb = lb.clone();
                Box::new(move || lb.keep_fence())
            }
        }
    }
}

/// The nftables script `toa-lb run` applies at start for `config`: the
/// kernel datapath's table, or the user-space datapaths' fence (`toa-lb
/// check --ruleset`, to review it before it meets a host's own firewall).
pub fn nft_script(config: &LbConfig) -> Result<String, String> {
    match config.datapath {
        Datapath::Kernel => crate::datapath::kernel::ruleset_script(config),
        Datapath::Ring | Datapath::Pnet => {
            Ok(fence::script(&fenced(config), &[&config.client_interface, &config.backend_interface]))
        }
    }
}

/// The addresses the user-space datapaths answer for, which their fence
/// keeps the host's own stack away from: the VIPs and the SNAT pool (once
/// each, in order).
fn fenced(config: &LbConfig) -> Vec<IpAddr> {
    let vips = config.engine.listeners.iter().map(|l| l.vip.ip());
    let set: std::collections::BTreeSet<IpAddr> = vips.chain(config.engine.snat.iter().copied()).collect();
    set.into_iter().collect()
}

/// Runs the load balancer of the configuration at `path` until SIGINT or
/// SIGTERM, with its control socket at `socket`.
pub fn run(path: &Path, socket: &Path) -> Result<(), DaemonError> {
    let config = LbConfig::load(path).map_err(fail)?;
    if !nix::unistd::Uid::effective().is_root() {
        return Err(fail("toa-lb needs root (nftables, eBPF or raw sockets, addresses)"));
    }
    // Block the signals before any thread starts, so that only the signal
    // thread (started below) takes them.
    let signals = {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(signal);
        }
        set
    };
    signals.thread_block().map_err(|e| fail(format!("cannot block SIGINT/SIGTERM/SIGHUP: {e}")))?;

    let stop = Stop::new().map_err(|e| fail(format!("cannot make the stop's socket pair: {e}")))?;
    let watch = InterfaceWatch::new(&[&config.client_interface, &config.backend_interface]);
    let (running, balancer) = start(&config)?;
    let watcher = watch.spawn(stop.clone(), running.keeper());
    let health = Arc::new(Mutex::new(config.health));
    let reloader = Arc::new(Reloader::new(path.to_owned(), config.clone(), balancer.clone(), health.clone()));
    // A signal only sets the stop (which wakes every thread waiting on it) or reloads.
    {
        let (stop, reloader) = (stop.clone(), reloader.clone());
        std::thread::spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal != Signal::SIGHUP {
                    stop.set();
                    return;
                }
                match reloader.reload() {
                    Ok(summary) => tracing::info!("SIGHUP: {}", summary.trim_end()),
                    Err(e) => {
                        tracing::error!("SIGHUP: reload rejected, the running configuration stays: {e}")
                    }
                }
            }
        });
    }
    let result = serve(&config, socket, &running, balancer, reloader, health, stop.clone());
    stop.set();
    // Before the cleanup: a look after it would put the removed tables back.
    let gone = watcher.join().unwrap_or_else(|_| Some("the interface watch panicked".into()));
    let (cleanup, removed) = match running {
        Running::Kernel(lb) => {
            (lb.stop().map_err(fail), ", the injector, the addresses and forwarding changes")
        }
        Running::Userspace { lock, .. } => {
            let fence = fence::remove().map_err(fail);
            (fence.and(lock.restore().map_err(fail)), "")
        }
    };
    if let Some(reason) = gone {
        if let Err(e) = cleanup {
            tracing::warn!("cleaning up: {e}");
        }
        return Err(fail(reason));
    }
    result?;
    cleanup?;
    tracing::info!("stopped; the nftables rules{removed} are removed");
    Ok(())
}

/// The interfaces a run works on, by name and index. One deleted (and
/// perhaps made again, with a new index) takes with it what the run put on
/// it: the injector's programs, addresses, per-interface sysctls, the rings'
/// bindings. Nothing would be served, silently; so the run stops with an
/// error instead (a service manager starts it again, and the start sets all
/// of it up anew). A link that goes down and up keeps its index: not a change.
struct InterfaceWatch(Vec<(String, Option<u32>)>);

/// How often [`InterfaceWatch`] looks.
const WATCH_EVERY: Duration = Duration::from_millis(500);

impl InterfaceWatch {
    fn new(names: &[&str]) -> Self {
        let mut seen: Vec<(String, Option<u32>)> = Vec::new();
        for name in names {
            if !seen.iter().any(|(n, _)| n == name) {
                seen.push(((*name).to_owned(), nix::net::if_::if_nametoindex(*name).ok()));
            }
        }
        InterfaceWatch(seen)
    }

    /// What changed, given each interface's index now (`None`: no such interface).
    fn changed(&self, index_of: impl Fn(&str) -> Option<u32>) -> Option<String> {
        self.0.iter().find_map(|(name, was)| {
            let now = index_of(name);
            (now != *was).then(|| match now {
                None => format!(
                    "interface {name} is gone: what toa-lb had put on it went with it; stopping (start toa-lb again once the interface is back; systemd's Restart=on-failure does)"
                ),
                Some(_) => format!(
                    "interface {name} was made again (a new index): what toa-lb had put on it went with the old one; stopping (start toa-lb again; systemd's Restart=on-failure does)"
                ),
            })
        })
    }

    /// Looks every [`WATCH_EVERY`] until `stop`; at a change, logs it, sets
    /// `stop` and ends with it. Each look also runs `keep` (what the datapath
    /// put in place, put back if someone else removed it).
    fn spawn(self, stop: Stop, keep: Box<dyn Fn() + Send>) -> JoinHandle<Option<String>> {
        std::thread::spawn(move || {
            // (A set stop ends the sleep at once: no look after it.)
            while !stop.sleep(WATCH_EVERY) {
                if let Some(reason) = self.changed(|name| nix::net::if_::if_nametoindex(name).ok()) {
                    tracing::error!("{reason}");
                    stop.set();
                    return Some(reason);
                }
                keep();
            }
            None
        })
    }
}

/// Starts the configured datapath.
fn start(config: &LbConfig) -> Result<(Running, Arc<dyn Balancer>), DaemonError> {
    let interfaces = [config.client_interface.as_str(), config.backend_interface.as_str()];
    match config.datapath {
        Datapath::Kernel => {
            let lb = Arc::new(KernelLb::start(config).map_err(fail)?);
            Ok((Running::Kernel(lb.clone()), lb))
        }
        Datapath::Ring | Datapath::Pnet => {
            // The lock first, as the kernel datapath takes it: a second toa-lb
            // here must not touch this one's fence. Then what a crashed run of
            // the kernel datapath left (its addresses and forwarding, then its
            // table and programs), which would fight this one.
            let host = Host::recover().map_err(fail)?;
            match start_userspace(config, &interfaces) {
                Ok((shards, owned, lb)) => {
                    Ok((Running::Userspace { shards, owned, lb: lb.clone(), lock: host }, lb))
                }
                Err(e) => {
                    let _ = host.restore();
                    Err(e)
                }
            }
        }
    }
}

/// The ring or pnet datapath's start, under the namespace's lock.
fn start_userspace(
    config: &LbConfig,
    interfaces: &[&str; 2],
) -> Result<(Arc<Shards>, frames::Owned, Arc<UserspaceLb>), DaemonError> {
    let name = if config.datapath == Datapath::Ring { "ring" } else { "pnet" };
    crate::datapath::kernel::clean_up_after_crash(interfaces).map_err(fail)?;
    offload::check(name, interfaces, config.offloads).map_err(fail)?;
    let client = frames::interface(&config.client_interface).map_err(fail)?;
    frames::interface(&config.backend_interface).map_err(fail)?;
    let vips: Vec<IpAddr> = config.engine.listeners.iter().map(|l| l.vip.ip()).collect();
    frames::check_vips(&client, &vips).map_err(fail)?;
    let fenced = fenced(config);
    fence::install(&fenced, interfaces).map_err(fail)?;
    let owned: HashSet<IpAddr> = fenced.into_iter().collect();
    let mut engine = config.engine.clone();
    engine.snat_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
        .unwrap_or(0);
    let workers = if config.datapath == Datapath::Ring { config.workers } else { 1 };
    let shards = match Shards::new(&engine, workers) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let _ = fence::remove();
            return Err(fail(e));
        }
    };
    let owned: frames::Owned = Arc::new(RwLock::new(owned));
    let balancer = Arc::new(UserspaceLb::new(
        shards.clone(),
        owned.clone(),
        [config.client_interface.clone(), config.backend_interface.clone()],
    ));
    Ok((shards, owned, balancer))
}

/// Serves control, metrics and health, and runs the datapath until `stop`.
fn serve(
    config: &LbConfig,
    socket: &Path,
    running: &Running,
    balancer: Arc<dyn Balancer>,
    reloader: Arc<Reloader>,
    health: Arc<Mutex<Option<health::HealthCheck>>>,
    stop: Stop,
) -> Result<(), DaemonError> {
    let reload: ctl::Reload = Arc::new(move || reloader.reload().map_err(|e| e.to_string()));
    ctl::serve(socket, balancer.clone(), reload, stop.clone())
        .map_err(|e| fail(format!("control socket {}: {e}", socket.display())))?;
    if let Some(addr) = config.metrics {
        metrics::serve(addr, balancer.clone(), stop.clone())
            .map_err(|e| fail(format!("metrics on {addr}: {e}")))?;
    }
    health::spawn(balancer, health, stop.clone());
    for l in &config.engine.listeners {
        let backends: Vec<String> = l.backends.iter().map(|b| b.addr.to_string()).collect();
        eprintln!(
            "toa-lb: listener {} -> {} (obtain_client_ip {})",
            ctl::listener_name(l),
            backends.join(", "),
            ctl::mode_name(l.obtain_client_ip)
        );
    }
    // Said once the datapath takes frames (the user-space ones open their sockets first).
    let ready = || {
        tracing::info!(
            clients = %config.client_interface,
            backends = %config.backend_interface,
            datapath = ?config.datapath,
            "running on the interfaces"
        );
    };
    match running {
        Running::Kernel(lb) => {
            ready();
            lb.spawn_poller(stop.clone());
            stop.wait();
            Ok(())
        }
        Running::Userspace { shards, owned, .. } => {
            let client = frames::interface(&config.client_interface).map_err(fail)?;
            let backend = frames::interface(&config.backend_interface).map_err(fail)?;
            let result = if config.datapath == Datapath::Ring {
                crate::datapath::ring::run(
                    shards.clone(),
                    &client,
                    &backend,
                    owned.clone(),
                    config.busy_poll,
                    stop,
                    ready,
                )
            } else {
                crate::datapath::pnet::run(shards.clone(), &client, &backend, owned.clone(), stop, ready)
            };
            result.map_err(fail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_watch_names_what_went_and_what_came_back_anew() {
        let watch = InterfaceWatch(vec![("lb-c".into(), Some(5)), ("lb-br".into(), Some(7))]);
        assert_eq!(watch.changed(|n| if n == "lb-c" { Some(5) } else { Some(7) }), None);
        let gone = watch.changed(|n| if n == "lb-c" { None } else { Some(7) }).unwrap();
        assert!(gone.starts_with("interface lb-c is gone"), "{gone}");
        let anew = watch.changed(|n| if n == "lb-br" { Some(9) } else { Some(5) }).unwrap();
        assert!(anew.starts_with("interface lb-br was made again"), "{anew}");
        // One interface for both sides is watched once.
        let one = InterfaceWatch::new(&["lo", "lo"]);
        assert_eq!(one.0.len(), 1);
        assert!(one.0[0].1.is_some());
    }

    #[test]
    fn nft_script_is_the_datapaths_own() {
        let text = |datapath: &str| {
            format!(
                "datapath = \"{datapath}\"\nclient_interface = \"lb-c\"\nbackend_interface = \"lb-br\"\n\
                 snat = [\"100.125.1.1\"]\n[[listener]]\nvip = \"203.0.113.10:80\"\n\
                 [[listener.backend]]\naddress = \"100.125.2.1:8080\"\n"
            )
        };
        let kernel = nft_script(&LbConfig::parse("k", &text("kernel")).unwrap()).unwrap();
        assert!(kernel.starts_with("add table inet toa_lb\n"), "{kernel}");
        assert!(kernel.contains("dnat ip to ct mark map { 0x7a000001 : 100.125.2.1 . 8080 }"), "{kernel}");
        let ring = nft_script(&LbConfig::parse("r", &text("ring")).unwrap()).unwrap();
        assert!(ring.contains("hook ingress device \"lb-br\""), "{ring}");
        // The VIP and the SNAT address, in a fixed order.
        assert!(ring.contains("ip daddr { 100.125.1.1, 203.0.113.10 } drop"), "{ring}");
    }
}
