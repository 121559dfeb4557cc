//! The kernel datapath (the default): the kernel forwards every byte, with
//! its offloads on; `toa-lb` only configures it and adds the TOA.
//!
//! ```text
//!  client ──▶ [client interface: tc ingress: injector] ──▶ conntrack ──▶ nft DNAT (scheduler)
//!                strips forged TOAs, writes the client's            │
//!                TOA into SYN / handshake ACK / data                 ▼
//!  client ◀── [tc egress: MSS lowered in the SYN-ACK] ◀── un-NAT ◀── nft SNAT (pool) ──▶ backend
//! ```
//!
//! - [`ruleset`]: one nftables table, `inet toa_lb`: DNAT by scheduler with
//!   nft maps, SNAT to the pool (fully-random; none for transparent flows,
//!   which the injector marks), conntrack timeouts, per-backend counters,
//!   the `max_flows` bound, a guard for the VIP and SNAT addresses.
//! - [`injector`]: the tc-BPF program pair on the client interface.
//! - [`conntrack`]: flows per listener and backend, from the connection tracker.
//! - [`host`]: the VIP and SNAT addresses and forwarding, undone at exit and
//!   after a crash.
//!
//! A flow's mode is fixed at its SYN: the injector records TOA flows from the
//! SYN to their end, and marks a transparent flow's first packet, which is
//! the one conntrack makes its NAT decision on.

pub mod conntrack;
pub mod host;
pub mod injector;
pub mod ruleset;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::control::Stop;
use crate::datapath::{Balancer, Complaints, ControlError, ListenerView, Snapshot};
use crate::engine::config::{Backend, ObtainClientIp, Protocol};
use crate::engine::listeners::Listeners;
use crate::engine::{BackendCounters, Counters, ListenerKey};
use crate::file::LbConfig;
use crate::nft;

use self::host::Host;
use self::injector::{InjectListener, Injector, InjectorOptions};
use self::ruleset::{Ids, Inputs, MARK_BASE, MARK_MASK, TABLE};

/// What can stop the kernel datapath from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The injector.
    #[error(transparent)]
    Inject(#[from] injector::InjectError),
    /// nftables.
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    /// Addresses, forwarding.
    #[error(transparent)]
    Host(#[from] host::HostError),
    /// Anything else, said so that it can be fixed.
    #[error("{0}")]
    Other(String),
}

/// How old the flow counts may be before a snapshot dumps conntrack again.
const FLOWS_TTL: Duration = Duration::from_millis(500);

/// The kernel datapath while it runs.
pub struct KernelLb {
    state: Mutex<State>,
}

impl std::fmt::Debug for KernelLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelLb")
    }
}

struct State {
    config: LbConfig,
    listeners: Listeners,
    ids: Ids,
    /// How many backend ids the ids file holds (they only grow while the
    /// process runs): see [`State::assign_ids`].
    ids_saved: usize,
    /// The listener chains in the table.
    chains: Vec<String>,
    /// Taken at stop: dropping it detaches the programs.
    injector: Option<Injector>,
    /// Whether its egress program watches the backends' data (data
    /// placement): once on, on until exit.
    watching_data: bool,
    /// When [`KernelLb::keep`] last looked for the injector's programs.
    programs_checked: Option<Instant>,
    host: Option<Host>,
    health_changes: BTreeMap<ListenerKey, u64>,
    /// Half-open flows deleted to make room, per listener.
    evicted: BTreeMap<ListenerKey, u64>,
    /// Whether max_flows was reached at the last poll (for the log).
    full: bool,
    /// Flows by conntrack mark, and when they were counted.
    flows: Option<(Instant, HashMap<u32, usize>)>,
    /// The table's named counters as they were last read, and what earlier
    /// tables had counted: see [`NftCounters`].
    counters: NftCounters,
    /// What [`KernelLb::keep`] put back.
    put_back: PutBack,
    /// The periodic work's failures, said once a minute.
    complaints: Complaints,
}

/// What someone else removed and [`KernelLb::keep`] put back, by what.
#[derive(Clone, Copy, Debug, Default)]
struct PutBack {
    table: u64,
    address: u64,
    forwarding: u64,
    programs: u64,
}

impl PutBack {
    /// As [`Snapshot::put_back`] lists it.
    fn list(self) -> Vec<(&'static str, u64)> {
        vec![
            ("table", self.table),
            ("address", self.address),
            ("forwarding", self.forwarding),
            ("programs", self.programs),
        ]
    }
}

/// The nftables counters (`(packets, bytes)` by name) across tables: when
/// someone else removes the table and [`KernelLb::keep`] puts it back, its
/// counters start from zero; the values last read (by a snapshot: a
/// scrape, `ctl stats`) are then carried over, so that totals go on (less
/// what was counted between that read and the removal) instead of falling.
/// The same when someone resets them (`nft reset counters`): a counter read
/// lower than before was reset.
#[derive(Debug, Default)]
struct NftCounters {
    /// Counted by tables that are gone, and before resets.
    carried: HashMap<String, (u64, u64)>,
    /// The present table's, as last read.
    last: HashMap<String, (u64, u64)>,
    /// Reads begun (numbered), and the number of the last one taken. A read
    /// numbered at most `taken` is left out: older than one already taken (it
    /// would look like a reset), or begun before a put-back (it may have read
    /// the old table).
    begun: u64,
    taken: u64,
}

/// Adds `(packets, bytes)` to the counter `name` of `map`.
fn add(map: &mut HashMap<String, (u64, u64)>, name: String, (packets, bytes): (u64, u64)) {
    let counter = map.entry(name).or_default();
    counter.0 += packets;
    counter.1 += bytes;
}

impl NftCounters {
    /// Numbers a read about to begin (call with the state locked).
    fn begin(&mut self) -> u64 {
        self.begun += 1;
        self.begun
    }

    /// Takes `read` (begun as `number`) as the present table's counters,
    /// and returns the totals: those plus what earlier tables counted, and
    /// what counters had before they were reset. A read begun before a
    /// put-back may be the old table's or the new one's, and one begun before
    /// the last read taken is older than it: both are left out.
    fn totals(&mut self, number: u64, read: HashMap<String, (u64, u64)>) -> HashMap<String, (u64, u64)> {
        if number > self.taken {
            self.taken = number;
            for (name, now) in read {
                let before = self.last.insert(name.clone(), now);
                if let Some(before) = before.filter(|b| now.0 < b.0 || now.1 < b.1) {
                    add(&mut self.carried, name, before);
                }
            }
        }
        let mut totals = self.carried.clone();
        for (name, counted) in &self.last {
            add(&mut totals, name.clone(), *counted);
        }
        totals
    }

    /// The table is gone: what it counted is carried over to the next, and
    /// reads begun until now are left out.
    fn table_gone(&mut self) {
        for (name, counted) in self.last.drain() {
            add(&mut self.carried, name, counted);
        }
        self.taken = self.begun;
    }
}

impl State {
    /// Numbers new listeners and backends, and writes the backend ids down
    /// when there are new ones, for the next run (see [`Ids`]). A failed write
    /// is said and does not stop anything: only counters would suffer.
    fn assign_ids(&mut self) -> Result<(), ControlError> {
        self.ids.assign(&self.listeners).map_err(ControlError::Datapath)?;
        if self.ids.backends.len() != self.ids_saved {
            let path = host::ids_path();
            let partial = path.with_extension("ids.new");
            let written =
                std::fs::write(&partial, self.ids.to_text()).and_then(|()| std::fs::rename(&partial, &path));
            match written {
                Ok(()) => self.ids_saved = self.ids.backends.len(),
                Err(e) => tracing::warn!(
                    "{}: {e}; after a restart, open flows' traffic may be counted to other backends",
                    path.display()
                ),
            }
        }
        Ok(())
    }

    fn render(&mut self) -> Result<(), ControlError> {
        self.assign_ids()?;
        let (script, chains) =
            ruleset::render(&inputs(&self.config, &self.listeners), &self.ids, &self.chains);
        nft::apply(&script).map_err(|e| ControlError::Datapath(e.to_string()))?;
        self.chains = chains;
        Ok(())
    }

    fn inject_listener(&self, index: usize) -> Option<InjectListener> {
        let l = self.listeners.get(index)?;
        Some(InjectListener {
            vip: l.config.vip,
            protocol: l.config.protocol,
            slot: *self.ids.slots.get(&l.key())?,
            mode: l.config.obtain_client_ip,
            placement: l.config.placement,
            clamp_mss: l.config.mss_clamp.applies(l.config.placement),
        })
    }

    /// Attaches the backends' egress program to the backend interface (when
    /// it is not the clients') once a UDP listener exists: it writes UOAs,
    /// and only datagrams need it. Without one, packets to backends go out
    /// without a program on the way (a tc hook costs on every packet), so a
    /// reload that removes the last UDP listener detaches it again.
    fn sync_backend_egress(&mut self) -> Result<(), injector::InjectError> {
        let wanted = self.config.backend_interface != self.config.client_interface
            && self.listeners.configs().any(|l| l.protocol == Protocol::Udp);
        match self.injector.as_mut() {
            Some(injector) if wanted => injector.attach_egress(&self.config.backend_interface),
            Some(injector) => injector.detach_egress(),
            None => Ok(()),
        }
    }

    fn injector(&mut self) -> Result<&mut Injector, ControlError> {
        self.injector.as_mut().ok_or_else(|| ControlError::Datapath("stopped".into()))
    }

    /// Tells the injector every listener (before the table balances it, so
    /// that no connection is balanced without its TOA).
    fn sync_injector(&mut self) -> Result<(), ControlError> {
        self.assign_ids()?;
        for i in 0..self.listeners.all().len() {
            if let Some(l) = self.inject_listener(i) {
                self.injector()?.set_listener(&l).map_err(|e| ControlError::Datapath(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn flows(&mut self) -> &HashMap<u32, usize> {
        let fresh = self.flows.as_ref().is_some_and(|(at, _)| at.elapsed() < FLOWS_TTL);
        if !fresh {
            let counts = conntrack::count_by_mark(MARK_BASE, MARK_MASK).unwrap_or_else(|e| {
                tracing::warn!("reading conntrack: {e}");
                HashMap::new()
            });
            self.flows = Some((Instant::now(), counts));
        }
        &self.flows.get_or_insert_with(|| (Instant::now(), HashMap::new())).1
    }
}

/// The injector's options for `config` (`budget`: new flows let in at first;
/// `watching_data`: whether the egress program already watches the backends'
/// data, which it then goes on doing: flows with data placement may outlive
/// their listener's, and without the watch their TOA would never end).
fn injector_options(config: &LbConfig, budget: i64, watching_data: bool) -> InjectorOptions {
    InjectorOptions {
        flows: u32::try_from(config.engine.max_flows).unwrap_or(u32::MAX),
        transparent_mark: config.transparent_mark,
        data_placement: watching_data || config.engine.listeners.iter().any(|l| l.placement.data),
        udp_timeout: config.engine.timeouts.udp,
        budget,
        // Read at start and at each reload (an interface deleted and made
        // again has a new index); 0 (the client interface) if it is gone.
        mtu_ifindex: nix::net::if_::if_nametoindex(config.backend_interface.as_str()).unwrap_or(0),
        gate_mark: ruleset::GATE_MARK,
    }
}

/// How often the poller looks while new flows come in.
const POLL_BUSY: Duration = Duration::from_millis(200);
/// How often it looks, at the least, while none do.
const POLL_IDLE: Duration = Duration::from_secs(1);

/// The poller's next wait, after a wait of `every` and a poll that found work
/// (`busy`) or none. New flows bring it back to [`POLL_BUSY`] at once; each
/// poll without any doubles it, up to [`POLL_IDLE`]. The bound holds either
/// way: the injector stops letting flows in when its budget runs out, between
/// polls too; a poll only renews the budget and evicts half-open flows. What
/// the slower polls spare is the daemon's wakeups while only established
/// flows move bytes (each wakeup of a thread beside a bulk stream costs it
/// throughput on a small host; README, Performance).
fn next_poll(every: Duration, busy: bool) -> Duration {
    if busy { POLL_BUSY } else { (every * 2).min(POLL_IDLE) }
}

/// New flows the injector may let in: `max` minus the flows there are, minus
/// those it let in while they were counted.
fn budget(max: usize, flows: usize, admitted: i64) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX) - i64::try_from(flows).unwrap_or(i64::MAX) - admitted
}

/// Deletes half-open flows (closest to their timeout first) to bring `entries`
/// a tenth below `max`; returns the marks of those that went.
fn evict_half_open(entries: Vec<conntrack::Entry>, max: usize) -> Vec<u32> {
    let mut half_open: Vec<conntrack::Entry> = entries.iter().filter(|e| !e.assured).cloned().collect();
    half_open.sort_by_key(|e| e.timeout);
    let want = (entries.len() + max / 10 + 1).saturating_sub(max).min(half_open.len());
    match conntrack::delete(&half_open[..want]) {
        // (The deletes that failed found their entry gone already: near enough.)
        Ok(n) => half_open[..n.min(want)].iter().map(|e| e.mark).collect(),
        Err(e) => {
            tracing::warn!("evicting half-open flows: {e}");
            Vec::new()
        }
    }
}

/// The nftables script the kernel datapath applies at start for `config`
/// (`toa-lb check --ruleset`: to review before running it on a host with a
/// firewall of its own). Backends start up, as at start, and keep the ids a
/// previous run in this namespace gave them (a start would also keep those
/// of backends no longer configured whose flows go on).
pub fn ruleset_script(config: &LbConfig) -> Result<String, String> {
    let listeners = Listeners::new(&config.engine.listeners);
    let mut ids = Ids::carried_over(&saved_ids(), &listeners, |_| false);
    ids.assign(&listeners)?;
    Ok(ruleset::render(&inputs(config, &listeners), &ids, &[]).0)
}

/// What the table is rendered from: `listeners` as they run, the rest from `config`.
fn inputs<'a>(config: &'a LbConfig, listeners: &'a Listeners) -> Inputs<'a> {
    Inputs {
        listeners,
        snat: &config.engine.snat,
        timeouts: config.engine.timeouts,
        transparent_mark: config.transparent_mark,
    }
}

/// Turns forwarding on for `config`'s interfaces (first: until the VIPs are
/// local, a SYN that arrives early is forwarded back towards its VIP and
/// lost, and the client sends it again).
fn enable_forwarding(host: &mut Host, config: &LbConfig) -> Result<(), host::HostError> {
    for path in forwarding_sysctls(config) {
        host.set_sysctl(&path, "1")?;
    }
    Ok(())
}

/// The sysctls that must be 1 for `config`'s flows to be forwarded.
fn forwarding_sysctls(config: &LbConfig) -> Vec<String> {
    let mut paths: Vec<String> = [&config.client_interface, &config.backend_interface]
        .iter()
        .map(|iface| format!("net/ipv4/conf/{iface}/forwarding"))
        .collect();
    paths.dedup();
    if config.engine.listeners.iter().any(|l| l.vip.is_ipv6()) {
        // IPv6 forwards only when every interface does (Linux before 6.17 has no per-interface switch).
        paths.push("net/ipv6/conf/all/forwarding".into());
    }
    paths
}

/// Adds the VIPs and SNAT addresses: last, once the table balances them (a
/// SYN to a local VIP without its DNAT rule would be refused by the host).
fn add_addresses(host: &mut Host, config: &LbConfig) -> Result<(), host::HostError> {
    for l in &config.engine.listeners {
        host.add_address(&config.client_interface, l.vip.ip())?;
    }
    for snat in &config.engine.snat {
        host.add_address(&config.backend_interface, *snat)?;
    }
    Ok(())
}

/// Removes what a previous run in this network namespace left after a crash:
/// its table, its state (addresses, sysctls), stale tc filters, and the
/// user-space datapaths' fence.
pub fn clean_up_after_crash(interfaces: &[&str]) -> Result<(), KernelError> {
    nft::delete_table("inet", TABLE)?;
    crate::datapath::fence::remove()?;
    for iface in interfaces {
        injector::detach_stale(iface);
    }
    Ok(())
}

/// Warnings about host settings that would defeat the datapath, each one
/// line with its fix.
fn check_host(config: &LbConfig) {
    if let Ok(max) = conntrack::max() {
        if max < config.engine.max_flows {
            tracing::warn!(
                "net.netfilter.nf_conntrack_max is {max}, below max_flows ({}): the kernel drops new flows at {max}; raise it: sysctl -w net.netfilter.nf_conntrack_max={}",
                config.engine.max_flows,
                config.engine.max_flows * 2
            );
        }
    }
    // A forward chain of another table with policy drop drops our traffic
    // whatever our table says (Docker sets one, for instance).
    if let Ok(out) = std::process::Command::new("nft").args(["-j", "list", "chains"]).output() {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for item in json.get("nftables").and_then(|v| v.as_array()).into_iter().flatten() {
            let Some(chain) = item.get("chain") else { continue };
            let get = |k: &str| chain.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            if get("hook") == "forward" && get("policy") == "drop" && get("table") != TABLE {
                tracing::warn!(
                    "chain {} {} {} drops forwarded packets by default: toa-lb's flows need a rule there, e.g. `nft insert rule {} {} {} ct mark and {MARK_MASK:#x} == {MARK_BASE:#x} accept`",
                    get("family"),
                    get("table"),
                    get("name"),
                    get("family"),
                    get("table"),
                    get("name")
                );
            }
        }
    }
}

/// The backend ids a previous run in this namespace wrote down (none: a
/// first run, or a file that cannot be read).
fn saved_ids() -> Ids {
    std::fs::read_to_string(host::ids_path()).map(|text| Ids::from_text(&text)).unwrap_or_default()
}

/// The backend ids a previous run in this namespace used, for those still
/// configured or with flows in conntrack (a restart keeps flows).
fn previous_ids(listeners: &Listeners) -> Ids {
    let saved = saved_ids();
    if saved.backends.is_empty() {
        return saved;
    }
    let live = conntrack::count_by_mark(MARK_BASE, MARK_MASK).unwrap_or_default();
    Ids::carried_over(&saved, listeners, |mark| live.contains_key(&mark))
}

impl KernelLb {
    /// Sets the kernel up for `config`: cleans up after a crashed run,
    /// enables forwarding, adds the addresses, installs the table, loads and
    /// attaches the injector. On failure, what was done is undone.
    pub fn start(config: &LbConfig) -> Result<KernelLb, KernelError> {
        injector::preflight()?;
        injector::check_interface(&config.client_interface)?;
        injector::check_interface(&config.backend_interface)?;
        // The lock first: a second toa-lb must not touch the first one's
        // table. Then what a crashed run left, its addresses before its
        // table: while the table is there, the flows it carried go on, and
        // without their VIP and SNAT addresses the host's stack cannot reset
        // them (a VIP still local without the table's NAT would answer their
        // next segment with a reset).
        let mut host = Host::recover()?;
        // The interface is `toa-lb inject`'s: the two would strip and insert
        // over each other, and before TCX the clean-up below would remove
        // its filters.
        if injector::other_injector_on(&config.client_interface) {
            return Err(KernelError::Other(format!(
                "`toa-lb inject` has its injector on {0} (see `toa-lb inject status`); `toa-lb run` attaches its own there: detach that one first: toa-lb inject detach --iface {0}",
                config.client_interface
            )));
        }
        clean_up_after_crash(&[&config.client_interface, &config.backend_interface])?;
        check_host(config);
        // The order matters for clients already sending (a restart): the
        // injector knows the listeners before the table balances them, and the
        // VIPs become local only after that.
        let result = (|| {
            enable_forwarding(&mut host, config)?;
            let budget = budget(config.engine.max_flows, conntrack::total().unwrap_or(0), 0);
            let options = injector_options(config, budget, false);
            let injector = Injector::load(&options)?;
            let listeners = Listeners::new(&config.engine.listeners);
            let ids = previous_ids(&listeners);
            let mut state = State {
                config: config.clone(),
                listeners,
                ids,
                ids_saved: usize::MAX,
                chains: Vec::new(),
                injector: Some(injector),
                watching_data: options.data_placement,
                programs_checked: None,
                host: None,
                health_changes: BTreeMap::new(),
                evicted: BTreeMap::new(),
                full: false,
                flows: None,
                counters: NftCounters::default(),
                put_back: PutBack::default(),
                complaints: Complaints::default(),
            };
            state.sync_injector().map_err(|e| KernelError::Other(e.to_string()))?;
            if let Some(injector) = state.injector.as_mut() {
                injector.attach(&config.client_interface)?;
            }
            state.render().map_err(|e| KernelError::Other(e.to_string()))?;
            add_addresses(&mut host, config)?;
            state.sync_backend_egress()?;
            Ok::<_, KernelError>(state)
        })();
        match result {
            Ok(mut state) => {
                state.host = Some(host);
                Ok(KernelLb { state: Mutex::new(state) })
            }
            Err(e) => {
                let _ = host.restore();
                let _ = nft::delete_table("inet", TABLE);
                Err(e)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `max_flows`. The injector lets new flows in while its budget
    /// lasts; this sets the budget to `max_flows` minus the flows conntrack
    /// holds (and minus those let in meanwhile). The total count is one file;
    /// only when it reaches the bound are `toa-lb`'s own flows dumped, and
    /// then half-open ones, closest to their timeout first, are deleted to
    /// make room (as the user-space engine evicts them), so that a SYN flood
    /// cannot keep real clients out. Call it a few times a second. Returns
    /// whether it found work: flows let in since the last poll, or the bound
    /// reached.
    pub fn poll(&self) -> bool {
        let mut state = self.lock();
        let max = state.config.engine.max_flows;
        let Some(injector) = state.injector.as_mut() else { return false };
        let before = injector.budget().unwrap_or(0);
        let total = conntrack::total().unwrap_or(usize::MAX);
        let mut ours = total;
        if total >= max {
            match conntrack::dump(MARK_BASE, MARK_MASK) {
                Ok(entries) => {
                    ours = entries.len();
                    let mut counts = HashMap::new();
                    for e in &entries {
                        *counts.entry(e.mark).or_default() += 1;
                    }
                    state.flows = Some((Instant::now(), counts));
                    if ours >= max {
                        let marks = evict_half_open(entries, max);
                        ours -= marks.len();
                        let State { ids, evicted, .. } = &mut *state;
                        for mark in marks {
                            let owner = ids.backends.iter().find(|(_, id)| MARK_BASE | **id == mark);
                            if let Some(((key, _), _)) = owner {
                                *evicted.entry(*key).or_default() += 1;
                            }
                        }
                    }
                }
                Err(e) => state.complaints.warn(format!("reading conntrack: {e}")),
            }
        }
        let Some(injector) = state.injector.as_mut() else { return false };
        let admitted = before.saturating_sub(injector.budget().unwrap_or(before)).max(0);
        if let Err(e) = injector.set_budget(budget(max, ours, admitted)) {
            state.complaints.error(format!("setting the flow budget: {e}"));
        }
        let full = ours >= max;
        if full != state.full {
            state.full = full;
            if full {
                tracing::warn!(
                    "max_flows ({max}) reached: half-open flows are evicted, new flows wait for room"
                );
            } else {
                tracing::info!("below max_flows ({max}) again");
            }
        }
        admitted > 0 || total >= max
    }

    /// Puts back what someone else removed: the nftables table (`nft flush
    /// ruleset`, a firewall service restarted; without it no new flow is
    /// balanced and the host refuses connections to its VIPs; its counters
    /// go on from their last read), the VIP and SNAT
    /// addresses (a network manager reconfiguring the interface; without a
    /// VIP nobody answers ARP for it), forwarding (turned off, nothing is
    /// forwarded) and the injector's programs (detached: the table balances
    /// no new connection without them). Called periodically; says what it did.
    pub fn keep(&self) {
        let mut state = self.lock();
        if state.injector.is_none() {
            return; // stopped: the table is gone on purpose
        }
        let State { host, config, put_back, complaints, .. } = &mut *state;
        if let Some(host) = host.as_ref() {
            for ((interface, addr), done) in host.put_back_addresses() {
                match done {
                    Ok(()) => {
                        put_back.address += 1;
                        tracing::warn!("{addr} was removed from {interface} by someone else: put back");
                    }
                    Err(e) => complaints.error(format!("putting {addr} back on {interface}: {e}")),
                }
            }
            // (A change of net.ipv4.ip_forward sets every interface's.)
            for path in forwarding_sysctls(config) {
                match host::put_back_sysctl(&path, "1") {
                    Ok(false) => {}
                    Ok(true) => {
                        put_back.forwarding += 1;
                        tracing::warn!(
                            "{} was turned off by someone else: turned on again",
                            path.replace('/', ".")
                        );
                    }
                    Err(e) => complaints.error(format!("turning {} on again: {e}", path.replace('/', "."))),
                }
            }
        }
        // The programs (a TCX query, or before TCX two `tc` runs: every 2 s).
        if state.programs_checked.is_none_or(|at| at.elapsed() >= Duration::from_secs(2)) {
            state.programs_checked = Some(Instant::now());
            let interface = state.config.client_interface.clone();
            let running = injector::running_programs(&interface);
            if let Some(running) = running.filter(|n| *n < injector::PROGRAMS.len()) {
                if let Some(injector) = state.injector.as_mut() {
                    match injector.reattach() {
                        Ok(()) => {
                            state.put_back.programs += 1;
                            tracing::warn!(
                                "the injector's programs were detached from {interface} by someone else ({running} of {} left): attached again",
                                injector::PROGRAMS.len()
                            );
                        }
                        Err(e) => {
                            state
                                .complaints
                                .error(format!("attaching the injector to {interface} again: {e}"));
                        }
                    }
                }
            }
        }
        match nft::table_exists("inet", TABLE) {
            Ok(true) => {}
            Ok(false) => {
                state.chains.clear();
                state.counters.table_gone();
                match state.render() {
                    Ok(()) => {
                        state.put_back.table += 1;
                        tracing::warn!(
                            "the nftables table inet {TABLE} was removed by someone else (nft flush ruleset? a firewall service restarted?): put back; its counters go on from their last read"
                        );
                    }
                    Err(e) => {
                        state.complaints.error(format!("putting the nftables table inet {TABLE} back: {e}"))
                    }
                }
            }
            Err(e) => state.complaints.warn(format!("looking for the nftables table inet {TABLE}: {e}")),
        }
    }

    /// Runs [`KernelLb::poll`] until `stop` is set: every 200 ms while new
    /// flows come in, less often (up to a second) while none do.
    pub fn spawn_poller(self: &Arc<Self>, stop: Stop) {
        let lb = self.clone();
        std::thread::spawn(move || {
            let mut every = POLL_BUSY;
            while !stop.is_set() {
                every = next_poll(every, lb.poll());
                stop.sleep(every);
            }
        });
    }

    /// Removes everything: the injector, the table, the addresses; forwarding
    /// goes back to what it was. Flows in progress stop until a new start:
    /// conntrack keeps their NAT bindings, so a restart carries them on.
    pub fn stop(&self) -> Result<(), KernelError> {
        let mut state = self.lock();
        // The addresses first (and forwarding back as it was): packets of
        // flows in progress are dropped from then on, never reset by the
        // host's stack for meeting a local VIP or SNAT address without the
        // table's NAT; conntrack keeps the flows for the next start. Then the
        // table, and the programs last: no new connection is balanced
        // without its TOA meanwhile.
        let restored = state.host.take().map_or(Ok(()), Host::restore);
        let deleted = nft::delete_table("inet", TABLE);
        // Dropping the programs detaches them (their links die with them).
        drop(state.injector.take());
        injector::detach_stale(&state.config.client_interface);
        restored?;
        deleted?;
        Ok(())
    }

    fn listener_view(
        state: &mut State,
        index: usize,
        nft: &HashMap<String, (u64, u64)>,
    ) -> Option<ListenerView> {
        let flows = state.flows().clone();
        let l = state.listeners.get(index)?.clone();
        let key = l.key();
        let slot = *state.ids.slots.get(&key)?;
        let inj = state.injector.as_ref().map(|i| i.counters(slot)).unwrap_or_default();
        let counter = |name: String| nft.get(&name).copied().unwrap_or((0, 0));
        let mut c = Counters {
            injected: inj.injected,
            no_room: inj.no_room,
            stripped: inj.stripped,
            options_malformed: inj.malformed,
            mss_clamped: inj.mss_clamped,
            health_changes: state.health_changes.get(&key).copied().unwrap_or(0),
            evicted: state.evicted.get(&key).copied().unwrap_or(0),
            dropped_table_full: inj.table_full,
            uoa_injected: inj.uoa_injected,
            uoa_no_room: inj.uoa_no_room,
            uoa_stripped: inj.uoa_stripped,
            uoa_carriers: inj.uoa_carriers,
            dropped_unreadable: inj.unreadable,
            dropped_no_backend: counter(format!("l{slot}_nobackend")).0,
            ..Counters::default()
        };
        let mut active = 0;
        for ((k, _), id) in &state.ids.backends {
            if *k != key {
                continue;
            }
            c.flows += counter(format!("b{id}_f")).0;
            let (o, r) = (counter(format!("b{id}_o")), counter(format!("b{id}_r")));
            c.to_backend += o.0;
            c.bytes_to_backend += o.1;
            c.to_client += r.0;
            c.bytes_to_client += r.1;
            active += flows.get(&(MARK_BASE | id)).copied().unwrap_or(0);
        }
        // Flows that ended: conntrack forgets them, so they are what was made and is gone.
        c.expired = c.flows.saturating_sub(active as u64);
        let mut view = ListenerView::of(&l, c);
        view.flows = Some(active);
        Some(view)
    }
}

impl Balancer for KernelLb {
    fn snapshot(&self) -> Snapshot {
        let number = self.lock().counters.begin();
        let read = nft::counters("inet", TABLE).unwrap_or_else(|e| {
            tracing::warn!("reading the nftables counters: {e}");
            HashMap::new()
        });
        let mut state = self.lock();
        let nft = state.counters.totals(number, read);
        let count = state.listeners.all().len();
        let listeners: Vec<ListenerView> =
            (0..count).filter_map(|i| Self::listener_view(&mut state, i, &nft)).collect();
        let mut backends = BTreeMap::new();
        for ((key, addr), id) in &state.ids.backends {
            let counter = |suffix: &str| nft.get(&format!("b{id}_{suffix}")).copied().unwrap_or((0, 0));
            let (f, o, r) = (counter("f"), counter("o"), counter("r"));
            backends.insert(
                (*key, *addr),
                BackendCounters {
                    flows: f.0,
                    to_backend: o.0,
                    bytes_to_backend: o.1,
                    to_client: r.0,
                    bytes_to_client: r.1,
                },
            );
        }
        let flows = state.flows().values().sum();
        let mut datapath_drops = conntrack::drops();
        // Packets the injector dropped that no listener can be told for.
        let unattributed = state.injector.as_ref().map_or(0, |i| i.counters(injector::HOST_SLOT).unreadable);
        datapath_drops.push(("unreadable", unattributed));
        Snapshot { listeners, backends, flows, datapath_drops, unparsed: 0, put_back: state.put_back.list() }
    }

    fn set_mode(&self, listener: usize, mode: ObtainClientIp) -> Result<(), ControlError> {
        let mut state = self.lock();
        let before = state.listeners.clone();
        state.listeners.set_mode(listener, mode)?;
        // One map element: every new flow sees the old mode or the new one.
        let l = state.inject_listener(listener).ok_or(ControlError::Datapath("no such listener".into()))?;
        if let Err(e) = state.injector()?.set_listener(&l) {
            state.listeners = before;
            return Err(ControlError::Datapath(e.to_string()));
        }
        Ok(())
    }

    fn add_backend(&self, listener: usize, backend: Backend) -> Result<(), ControlError> {
        let mut state = self.lock();
        let before = state.listeners.clone();
        let snat = state.config.engine.snat.clone();
        state.listeners.add_backend(listener, backend, &snat)?;
        state.render().inspect_err(|_| state.listeners = before)
    }

    fn remove_backend(&self, listener: usize, addr: SocketAddr) -> Result<(), ControlError> {
        let mut state = self.lock();
        let before = state.listeners.clone();
        state.listeners.remove_backend(listener, addr)?;
        state.render().inspect_err(|_| state.listeners = before)
    }

    fn drain(&self, listener: usize, addr: SocketAddr, drain: bool) -> Result<(), ControlError> {
        let mut state = self.lock();
        let before = state.listeners.clone();
        state.listeners.drain(listener, addr, drain)?;
        state.render().inspect_err(|_| state.listeners = before)
    }

    fn set_backend_up(&self, listener: ListenerKey, addr: SocketAddr, up: bool) -> bool {
        let mut state = self.lock();
        let Some(index) = state.listeners.find(listener) else { return false };
        if !state.listeners.set_up(index, addr, up) {
            return false;
        }
        *state.health_changes.entry(listener).or_default() += 1;
        if let Err(e) = state.render() {
            tracing::error!("applying a health change: {e}");
        }
        true
    }

    fn reconfigure(&self, config: &LbConfig) -> Result<Option<usize>, ControlError> {
        let mut state = self.lock();
        let datapath = |e: &dyn std::fmt::Display| ControlError::Datapath(e.to_string());
        let before = (state.listeners.clone(), state.ids.clone(), state.config.clone());
        let old_keys: HashSet<ListenerKey> = state.listeners.all().iter().map(|l| l.key()).collect();
        state.listeners.reconfigure(&config.engine.listeners);
        let new_keys: HashSet<ListenerKey> = state.listeners.all().iter().map(|l| l.key()).collect();
        let State { ids, listeners, .. } = &mut *state;
        ids.retain_listeners(listeners);
        state.config = config.clone();
        let mut host = state.host.take();
        // As at the start: the injector first, the table, then the addresses.
        // The budget is the poller's (`set_options` leaves it).
        let options = injector_options(config, 0, state.watching_data);
        let result = (|| {
            // Before the listeners: a new one with data placement needs the
            // egress program to watch the backends' data from its first flow.
            state.injector()?.set_options(&options).map_err(|e| datapath(&e))?;
            state.watching_data = options.data_placement;
            state.sync_injector()?;
            state.render()?;
            if let Some(host) = host.as_mut() {
                enable_forwarding(host, config)
                    .and_then(|()| add_addresses(host, config))
                    .map_err(|e| datapath(&e))?;
            }
            state.sync_backend_egress().map_err(|e| datapath(&e))?;
            // Listeners that went: their packets pass untouched from now on.
            for (protocol, vip) in old_keys.difference(&new_keys) {
                state.injector()?.remove_listener(*vip, *protocol).map_err(|e| datapath(&e))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Listeners the injector was told of before the failure go again.
            for (protocol, vip) in new_keys.difference(&old_keys) {
                if let Err(remove) = state
                    .injector()
                    .and_then(|i| i.remove_listener(*vip, *protocol).map_err(|e| datapath(&e)))
                {
                    tracing::error!("removing {vip} from the injector after a failed reload: {remove}");
                }
            }
            (state.listeners, state.ids, state.config) = before;
            // (Still watching data if it started to: flows may have it.)
            let old_options = injector_options(&state.config, 0, state.watching_data);
            let restored = state
                .render()
                .and_then(|()| state.injector()?.set_options(&old_options).map_err(|e| datapath(&e)))
                .and_then(|()| state.sync_injector())
                .and_then(|()| state.sync_backend_egress().map_err(|e| datapath(&e)));
            if let Err(restore) = restored {
                tracing::error!("restoring the rules after a failed reload: {restore}");
            }
            state.host = host;
            return Err(e);
        }
        // The addresses of VIPs that are gone. SNAT addresses stay until exit:
        // flows that use one would lose their replies.
        if let Some(host) = host.as_mut() {
            let wanted: HashSet<IpAddr> = config.engine.listeners.iter().map(|l| l.vip.ip()).collect();
            for (iface, addr) in host.addresses() {
                if iface == config.client_interface && !wanted.contains(&addr) {
                    if let Err(e) = host.remove_address(&iface, addr) {
                        tracing::warn!("removing {addr} from {iface}: {e}");
                    }
                }
            }
        }
        state.host = host;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, u64, u64)]) -> HashMap<String, (u64, u64)> {
        pairs.iter().map(|(name, p, b)| ((*name).to_owned(), (*p, *b))).collect()
    }

    #[test]
    fn the_poller_slows_down_while_no_flow_comes_and_is_quick_again_at_the_first() {
        let mut every = POLL_BUSY;
        let mut waits = Vec::new();
        for _ in 0..5 {
            every = next_poll(every, false);
            waits.push(every.as_millis());
        }
        assert_eq!(waits, [400, 800, 1000, 1000, 1000]);
        assert_eq!(next_poll(every, true), POLL_BUSY);
        assert_eq!(next_poll(POLL_BUSY, true), POLL_BUSY);
    }

    #[test]
    fn counters_go_on_across_a_table_put_back() {
        let mut c = NftCounters::default();
        let t = c.begin();
        assert_eq!(
            c.totals(t, read(&[("b1_o", 10, 1000), ("b1_f", 2, 0)])),
            read(&[("b1_o", 10, 1000), ("b1_f", 2, 0)])
        );
        c.table_gone();
        // The new table counts from zero; the totals go on.
        let t = c.begin();
        assert_eq!(c.totals(t, read(&[("b1_o", 3, 300)])), read(&[("b1_o", 13, 1300), ("b1_f", 2, 0)]));
        let t = c.begin();
        assert_eq!(
            c.totals(t, read(&[("b1_o", 4, 400), ("b1_f", 1, 0)])),
            read(&[("b1_o", 14, 1400), ("b1_f", 3, 0)])
        );
        // A read begun before the next put-back may be either table's: left
        // out, and the totals do not fall.
        let t = c.begin();
        c.table_gone();
        assert_eq!(c.totals(t, read(&[("b1_o", 100, 10_000)])), read(&[("b1_o", 14, 1400), ("b1_f", 3, 0)]));
        // A failed read (nothing) changes nothing.
        let t = c.begin();
        assert_eq!(c.totals(t, HashMap::new()), read(&[("b1_o", 14, 1400), ("b1_f", 3, 0)]));
        let t = c.begin();
        assert_eq!(c.totals(t, read(&[("b1_o", 1, 1)])), read(&[("b1_o", 15, 1401), ("b1_f", 3, 0)]));
    }

    #[test]
    fn counters_go_on_across_a_reset() {
        let mut c = NftCounters::default();
        let t = c.begin();
        c.totals(t, read(&[("b1_o", 10, 1000), ("b1_f", 2, 0)]));
        // `nft reset counters`: b1_o starts again from zero; b1_f had counted nothing new.
        let t = c.begin();
        assert_eq!(
            c.totals(t, read(&[("b1_o", 1, 60), ("b1_f", 2, 0)])),
            read(&[("b1_o", 11, 1060), ("b1_f", 2, 0)])
        );
        // Two reads at once: the older one ends last, lower than the newer.
        // It is left out, not taken for a reset (which would count twice).
        let (older, newer) = (c.begin(), c.begin());
        assert_eq!(c.totals(newer, read(&[("b1_o", 5, 300)])), read(&[("b1_o", 15, 1300), ("b1_f", 2, 0)]));
        assert_eq!(c.totals(older, read(&[("b1_o", 3, 200)])), read(&[("b1_o", 15, 1300), ("b1_f", 2, 0)]));
    }
}
