//! The tc-BPF TOA injector (`bpf/inject.bpf.c`, built by
//! `scripts/build-bpf.sh`, object committed): loading it, filling its maps,
//! attaching it to an interface, reading its counters.
//!
//! Attached with TCX links on Linux 6.6 and later (they go away with the
//! process that holds them, or with their pins), with a clsact qdisc and tc
//! filters before that (removed by name at exit and at the next start).

use std::net::SocketAddr;
use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::tc::{self, SchedClassifier, TcAttachType};
use toa_core::{Format, Formats};

use crate::engine::config::{ObtainClientIp, Placement, Protocol};
use crate::sys::bpf::{Config as RawConfig, Listener as RawListener, ListenerKey as RawKey};

/// The compiled programs.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../bpf/inject.bpf.o");

/// The skb mark bits the ingress program sets on UDP datagrams that get a
/// UOA at egress: `UOA_MARK | the flow's slot` (as `inject.bpf.c` has them).
pub const UOA_MARKS: u32 = 0x4000_0000 | 0x003f_ffff;

/// Listener slots for counters (`MAX_LISTENERS` in the C source).
pub const MAX_LISTENERS: u32 = 1024;
/// The counters slot of what no listener can be told for (`HOST_SLOT`): its
/// `unreadable` counts IPv6 packets whose extension header chain is too long
/// or cut short, dropped.
pub const HOST_SLOT: u32 = MAX_LISTENERS;
/// Counters per slot (`NR_COUNTERS`).
const NR_COUNTERS: u32 = 11;
/// `config.flags`: some listener places the TOA in data.
const CFG_DATA_PLACEMENT: u32 = 1;
/// `listener.placement` bits (`PLACE_*`).
const PLACE_SYN: u8 = 1;
const PLACE_ACK: u8 = 2;
const PLACE_DATA: u8 = 4;
const PLACE_CLAMP: u8 = 16;
/// Not a format: Tencent's companion options, stripped with it (`FMT_COMPANION`).
const FMT_COMPANION: u8 = 1 << 5;

/// The programs, by name, and where each attaches.
pub(crate) const PROGRAMS: [(&str, TcAttachType); 2] =
    [("toa_lb_ingress", TcAttachType::Ingress), ("toa_lb_egress", TcAttachType::Egress)];
/// The egress program of the backend-facing interface (UOA), when it is another one.
const BACKEND_EGRESS: &str = "toa_lb_backend_egress";
/// The maps.
pub(crate) const MAPS: [&str; 8] = [
    "toa_lb_listeners",
    "toa_lb_flows",
    "toa_lb_tcp_flows",
    "toa_lb_counters",
    "toa_lb_config",
    "toa_lb_budget",
    "toa_lb_scratch",
    "toa_lb_carrier",
];

/// What can stop the injector, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// Not root.
    #[error("the TOA injector needs root: it loads eBPF programs and attaches them to an interface")]
    NotRoot,
    /// The kernel is too old.
    #[error("kernel {0} is too old: the TOA injector needs Linux 5.12 or later (use datapath = \"ring\")")]
    OldKernel(String),
    /// No such interface.
    #[error("interface {0} not found; run `ip link`")]
    NoInterface(String),
    /// Not an Ethernet interface.
    #[error("{0} is not an Ethernet interface (type {1}): the injector reads Ethernet frames")]
    NotEthernet(String, String),
    /// More listeners than slots.
    #[error("at most {MAX_LISTENERS} listeners")]
    TooManyListeners,
    /// An eBPF step failed.
    #[error("{0}: {1}")]
    Bpf(String, String),
}

fn bpf_err<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> InjectError {
    let what = what.into();
    move |e| InjectError::Bpf(what, e.to_string())
}

/// How the injector is set up.
#[derive(Clone, Copy, Debug)]
pub struct InjectorOptions {
    /// Flows remembered: TCP flows in TOA mode from SYN to handshake ACK
    /// (16 bytes each), UDP flows while they last (for the budget and UOA;
    /// 56 bytes). Each table gets the next power of two of slots, at most 2^22.
    pub flows: u32,
    /// The skb mark bit of transparent flows (0: never set).
    pub transparent_mark: u32,
    /// Whether a listener may place the TOA in data (the egress program then
    /// watches data from backends).
    pub data_placement: bool,
    /// How long a UDP flow lives without datagrams (conntrack's timeout for it).
    pub udp_timeout: std::time::Duration,
    /// New flows allowed at first (see [`Injector::set_budget`]); `i64::MAX`: no bound.
    pub budget: i64,
    /// The interface (index) toward the backends, whose MTU a segment the
    /// TOA grows must fit; 0: the interface the segment came in on.
    pub mtu_ifindex: u32,
    /// The skb mark bit set on every TCP SYN and UDP datagram to a listener
    /// that went through the ingress program (0: never). `toa-lb run`'s table
    /// balances new flows only with it, so that nothing is balanced while the
    /// programs are not running (after a crash, until the next start):
    /// without its TOA or UOA, and without a client's forged one stripped.
    pub gate_mark: u32,
}

/// A listener as the injector knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectListener {
    /// VIP and port (as clients address it, before any NAT).
    pub vip: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Its counters' slot, below [`MAX_LISTENERS`].
    pub slot: u32,
    /// What new flows get.
    pub mode: ObtainClientIp,
    /// Where the TOA goes.
    pub placement: Placement,
    /// Whether the backends' SYN-ACK MSS is lowered by the option's size
    /// ([`crate::engine::config::MssClamp::applies`]).
    pub clamp_mss: bool,
}

/// The injector's counters of one listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectorCounters {
    /// TOA options written.
    pub injected: u64,
    /// Segments that should have carried one and had no room (or were GSO batches).
    pub no_room: u64,
    /// TOA-format options clients sent, overwritten with NOPs.
    pub stripped: u64,
    /// Client segments whose options overran the header (cut at the fault).
    pub malformed: u64,
    /// SYN-ACKs whose MSS was lowered.
    pub mss_clamped: u64,
    /// New flows dropped: no budget left (max_flows).
    pub table_full: u64,
    /// UOAs written into datagrams (at egress to the backends).
    pub uoa_injected: u64,
    /// Datagrams that should have carried a UOA and had no room (the MTU,
    /// IPv4 options, a GSO batch): sent without.
    pub uoa_no_room: u64,
    /// UOAs clients sent, removed.
    pub uoa_stripped: u64,
    /// Empty datagrams sent only to carry a UOA, ahead of a datagram with no room.
    pub uoa_carriers: u64,
    /// TCP segments dropped because the program cannot read into them (an
    /// IPv4 fragment, IPv6 extension headers), or could not read or rewrite
    /// their options: a client's TOA in them could not be stripped.
    pub unreadable: u64,
}

/// Checks what the injector needs: root and Linux 5.12 or later (`bpf_check_mtu`).
pub fn preflight() -> Result<(), InjectError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(InjectError::NotRoot);
    }
    let release =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    if kernel_version(&release) < (5, 12) {
        return Err(InjectError::OldKernel(release));
    }
    Ok(())
}

fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Set (to anything) to attach tc programs the way kernels before 6.6 need
/// (clsact qdisc and netlink filters) on a newer kernel too: how the tests
/// cover that path (Debian 12's 6.1) on a machine with TCX.
pub const NETLINK_TC_ENV: &str = "TOA_LB_TC_NETLINK";

/// Whether tc programs are attached with TCX links (Linux 6.6+, unless
/// [`NETLINK_TC_ENV`] is set).
fn has_tcx() -> bool {
    if std::env::var_os(NETLINK_TC_ENV).is_some() {
        return false;
    }
    let release =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    kernel_version(&release) >= (6, 6)
}

/// Whether `toa-lb inject` has its injector on `interface`: pinned under
/// the default pin directory, or (with TCX, whose links die with the
/// process that made them, so that what is attached belongs to something
/// alive) attached at all. Asked by `toa-lb run` before it takes the
/// interface (its lock keeps a second `run` out before that).
pub fn other_injector_on(interface: &str) -> bool {
    crate::inject::is_pinned(Path::new(crate::inject::PIN_DIR), interface)
        || (has_tcx() && !attached_programs(interface).is_empty())
}

/// Checks that `interface` exists in this network namespace and is Ethernet.
pub fn check_interface(interface: &str) -> Result<(), InjectError> {
    let kind =
        crate::sys::link_type(interface).map_err(|_| InjectError::NoInterface(interface.to_owned()))?;
    if kind != libc::ARPHRD_ETHER {
        return Err(InjectError::NotEthernet(interface.to_owned(), kind.to_string()));
    }
    Ok(())
}

/// The option kinds the injector strips from clients: every format at its
/// default kind (a bit per format, in [`Format::ALL`] order), and Tencent's
/// companions (bit 5). `scan_options` in `bpf/options.h` reads it;
/// `toa-bpf-parity` checks the pair against [`toa_core::strip`].
pub fn kind_formats() -> [u8; 256] {
    let mut kinds = [0u8; 256];
    let all = Formats::ALL;
    for (i, format) in Format::ALL.iter().enumerate() {
        kinds[usize::from(all.kind(*format))] |= 1 << i;
    }
    kinds[usize::from(toa_core::kind::TENCENT_VPC_ID)] |= FMT_COMPANION;
    kinds[usize::from(toa_core::kind::TENCENT_VIP)] |= FMT_COMPANION;
    kinds
}

fn raw_key(vip: SocketAddr, protocol: Protocol) -> RawKey {
    let mut addr = [0u8; 16];
    let family = match vip.ip() {
        std::net::IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            4
        }
        std::net::IpAddr::V6(v6) => {
            addr.copy_from_slice(&v6.octets());
            6
        }
    };
    let proto = match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    };
    RawKey { addr, port: vip.port().to_be_bytes(), family, proto }
}

fn raw_listener(l: &InjectListener) -> RawListener {
    let (mode, format) = match l.mode {
        ObtainClientIp::Off => (0, Format::Toa),
        ObtainClientIp::Toa(format) => (1, format),
        ObtainClientIp::Transparent => (2, Format::Toa),
        ObtainClientIp::Uoa { .. } => (3, Format::Toa),
    };
    let all = Formats::ALL;
    // As the engine's `toa_for`: an IPv4 client gets toa (or tencent), an IPv6 one toa6 (or ali-v6).
    let kind4 = all.kind(if format == Format::Tencent { Format::Tencent } else { Format::Toa });
    let kind6 = all.kind(if format == Format::AliV6 { Format::AliV6 } else { Format::Toa6 });
    if let ObtainClientIp::Uoa { format, datagrams } = l.mode {
        // UOA: kind4 is the format, placement the datagrams that carry it.
        let format = match format {
            toa_core::uoa::UoaFormat::Opp => 0,
            toa_core::uoa::UoaFormat::Ipo => 1,
        };
        return RawListener { slot: l.slot, mode, placement: datagrams, kind4: format, kind6: format };
    }
    let bit = |on: bool, bit: u8| if on { bit } else { 0 };
    let placement = bit(l.placement.syn, PLACE_SYN)
        | bit(l.placement.handshake_ack, PLACE_ACK)
        | bit(l.placement.data, PLACE_DATA)
        | bit(l.clamp_mss, PLACE_CLAMP);
    RawListener { slot: l.slot, mode, placement, kind4, kind6 }
}

/// The loaded injector: its programs and maps, and where it is attached.
pub struct Injector {
    ebpf: aya::Ebpf,
    /// Slots of each flow table (a power of two).
    slots: u32,
    interface: Option<String>,
    /// The links `attach` made, by program.
    links: Vec<(&'static str, aya::programs::tc::SchedClassifierLinkId)>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").field("interface", &self.interface).finish_non_exhaustive()
    }
}

impl Injector {
    /// Loads the programs (the verifier checks them here) and writes the
    /// configuration; nothing is attached yet.
    pub fn load(options: &InjectorOptions) -> Result<Injector, InjectError> {
        preflight()?;
        let slots = options.flows.clamp(1024, 1 << 22).next_power_of_two();
        let ebpf = aya::EbpfLoader::new()
            .map_max_entries("toa_lb_flows", slots)
            .map_max_entries("toa_lb_tcp_flows", slots)
            .load(OBJECT)
            .map_err(bpf_err("load the injector's eBPF object"))?;
        let mut injector = Injector { ebpf, slots, interface: None, links: Vec::new() };
        injector.set_options(options)?;
        injector.set_budget(options.budget)?;
        let ebpf = &mut injector.ebpf;
        for name in PROGRAMS.iter().map(|(name, _)| *name).chain([BACKEND_EGRESS]) {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or_else(missing(name))?.try_into().map_err(bpf_err(name))?;
            program.load().map_err(bpf_err(format!("load {name} (the kernel verifier said no)")))?;
        }
        Ok(injector)
    }

    /// Writes the programs' configuration from `options` (at load, and when a
    /// reload changes the listeners' placements, the UDP timeout or the
    /// backend interface). The flow tables keep the size they were loaded
    /// with (`flows` is read at load only), and the budget is left as it is.
    pub fn set_options(&mut self, options: &InjectorOptions) -> Result<(), InjectError> {
        let config = RawConfig {
            transparent_mark: options.transparent_mark,
            flags: if options.data_placement { CFG_DATA_PLACEMENT } else { 0 },
            udp_timeout_ns: u64::try_from(options.udp_timeout.as_nanos()).unwrap_or(u64::MAX),
            flow_mask: self.slots - 1,
            tcp_flow_mask: self.slots - 1,
            kind_formats: kind_formats(),
            mtu_ifindex: options.mtu_ifindex,
            gate_mark: options.gate_mark,
        };
        let map = self.ebpf.map_mut("toa_lb_config").ok_or_else(missing("toa_lb_config"))?;
        let mut map: Array<_, RawConfig> = Array::try_from(map).map_err(bpf_err("toa_lb_config"))?;
        map.set(0, config, 0).map_err(bpf_err("write toa_lb_config"))
    }

    fn budget_map(&mut self) -> Result<Array<&mut MapData, i64>, InjectError> {
        let map = self.ebpf.map_mut("toa_lb_budget").ok_or_else(missing("toa_lb_budget"))?;
        Array::try_from(map).map_err(bpf_err("toa_lb_budget"))
    }

    /// Sets how many new flows the programs may still let in (each SYN, and
    /// each UDP datagram that starts a flow, takes one; at zero they drop).
    pub fn set_budget(&mut self, budget: i64) -> Result<(), InjectError> {
        self.budget_map()?.set(0, budget, 0).map_err(bpf_err("write toa_lb_budget"))
    }

    /// What is left of the budget.
    pub fn budget(&mut self) -> Result<i64, InjectError> {
        self.budget_map()?.get(&0, 0).map_err(bpf_err("read toa_lb_budget"))
    }

    fn listeners(&mut self) -> Result<BpfHashMap<&mut MapData, RawKey, RawListener>, InjectError> {
        let map = self.ebpf.map_mut("toa_lb_listeners").ok_or_else(missing("toa_lb_listeners"))?;
        BpfHashMap::try_from(map).map_err(bpf_err("toa_lb_listeners"))
    }

    /// Adds or updates a listener: new flows to it follow at once.
    pub fn set_listener(&mut self, listener: &InjectListener) -> Result<(), InjectError> {
        if listener.slot >= MAX_LISTENERS {
            return Err(InjectError::TooManyListeners);
        }
        let (key, value) = (raw_key(listener.vip, listener.protocol), raw_listener(listener));
        self.listeners()?.insert(key, value, 0).map_err(bpf_err(format!("listener {}", listener.vip)))
    }

    /// Removes a listener: its packets pass untouched.
    pub fn remove_listener(&mut self, vip: SocketAddr, protocol: Protocol) -> Result<(), InjectError> {
        match self.listeners()?.remove(&raw_key(vip, protocol)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(InjectError::Bpf(format!("remove listener {vip}"), e.to_string())),
        }
    }

    /// Attaches both programs to `interface` (ingress and egress). They stay
    /// attached while this value lives (or its links are pinned).
    pub fn attach(&mut self, interface: &str) -> Result<(), InjectError> {
        self.attach_programs(interface, &PROGRAMS)?;
        self.interface = Some(interface.to_owned());
        Ok(())
    }

    /// Attaches the client-side programs again, to the interface of
    /// [`Injector::attach`] (someone else detached them: `bpftool link
    /// detach`, or, before TCX, a tool that deleted the clsact qdisc).
    pub fn reattach(&mut self) -> Result<(), InjectError> {
        let Some(interface) = self.interface.clone() else { return Ok(()) };
        let (stale, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(name, _)| PROGRAMS.iter().any(|(p, _)| p == name));
        self.links = kept;
        for (name, id) in stale {
            // Gone already, most likely: only aya's record of it goes.
            if let Some(Ok(program)) = self.ebpf.program_mut(name).map(<&mut SchedClassifier>::try_from) {
                let _ = program.detach(id);
            }
        }
        self.attach_programs(&interface, &PROGRAMS)
    }

    /// Attaches the backends' egress program to `interface`, the one that
    /// faces the backends when it is not the clients' (UOA goes in there,
    /// after the kernel's NAT). It stays attached while this value lives;
    /// once attached, attaching it again does nothing.
    pub fn attach_egress(&mut self, interface: &str) -> Result<(), InjectError> {
        if self.links.iter().any(|(name, _)| *name == BACKEND_EGRESS) {
            return Ok(());
        }
        self.attach_programs(interface, &[(BACKEND_EGRESS, TcAttachType::Egress)])
    }

    /// Detaches the backends' egress program ([`Injector::attach_egress`]);
    /// not attached is fine.
    pub fn detach_egress(&mut self) -> Result<(), InjectError> {
        let Some(at) = self.links.iter().position(|(name, _)| *name == BACKEND_EGRESS) else {
            return Ok(());
        };
        let (name, id) = self.links.remove(at);
        let program: &mut SchedClassifier =
            self.ebpf.program_mut(name).ok_or_else(missing(name))?.try_into().map_err(bpf_err(name))?;
        program.detach(id).map_err(bpf_err(format!("detach {name}")))
    }

    fn attach_programs(
        &mut self,
        interface: &str,
        programs: &[(&'static str, TcAttachType)],
    ) -> Result<(), InjectError> {
        check_interface(interface)?;
        detach_stale(interface);
        if !has_tcx() {
            // Before TCX, tc programs hang off a clsact qdisc (one may exist).
            match tc::qdisc_add_clsact(interface) {
                // There already (an earlier run's, someone else's): use it. The
                // kernel says EEXIST, with a message ("Exclusivity flag on")
                // that never names it.
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(tc::TcError::AlreadyAttached) | Ok(()) => {}
                Err(e) => {
                    return Err(InjectError::Bpf(
                        format!("add a clsact qdisc to {interface}"),
                        e.to_string(),
                    ));
                }
            }
        }
        for &(name, at) in programs {
            let program: &mut SchedClassifier =
                self.ebpf.program_mut(name).ok_or_else(missing(name))?.try_into().map_err(bpf_err(name))?;
            let options = if has_tcx() {
                aya::programs::tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default())
            } else {
                aya::programs::tc::TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default())
            };
            let id = program
                .attach_with_options(interface, at, options)
                .map_err(bpf_err(format!("attach {name} to {interface}")))?;
            self.links.push((name, id));
        }
        Ok(())
    }

    /// The counters of listener `slot` (or [`HOST_SLOT`]), summed over CPUs.
    pub fn counters(&self, slot: u32) -> InjectorCounters {
        let Some(map) = self.ebpf.map("toa_lb_counters") else { return InjectorCounters::default() };
        let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else { return InjectorCounters::default() };
        read_counters(&array, slot)
    }

    /// Pins the maps and the links under `dir`, so that the injector stays
    /// attached after this process exits (`toa-lb inject`). Needs TCX links
    /// (Linux 6.6); before that the tc filters stay on their own and only
    /// the maps are pinned.
    pub fn pin(mut self, dir: &Path) -> Result<(), InjectError> {
        for name in MAPS {
            let map = self.ebpf.map_mut(name).ok_or_else(missing(name))?;
            map.pin(dir.join(name)).map_err(bpf_err(format!("pin {name}")))?;
        }
        if !has_tcx() {
            // The filters outlive the process without a pin; keep them attached.
            std::mem::forget(self.ebpf);
            return Ok(());
        }
        for (name, id) in std::mem::take(&mut self.links) {
            let program: &mut SchedClassifier =
                self.ebpf.program_mut(name).ok_or_else(missing(name))?.try_into().map_err(bpf_err(name))?;
            let link = program.take_link(id).map_err(bpf_err(name))?;
            let link: FdLink = link.try_into().map_err(bpf_err(format!("{name}: not a TCX link")))?;
            link.pin(dir.join(format!("link_{name}"))).map_err(bpf_err(format!("pin link_{name}")))?;
        }
        Ok(())
    }
}

fn missing(name: &str) -> impl FnOnce() -> InjectError + '_ {
    move || InjectError::Bpf(name.to_owned(), "missing from the eBPF object".into())
}

/// Reads one slot's counters from `toa_lb_counters` (this process's or a
/// pinned one), each summed over the CPUs; one that cannot be read is 0.
fn read_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, u64>,
    slot: u32,
) -> InjectorCounters {
    let get = |i: u32| array.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
    let base = slot * NR_COUNTERS;
    InjectorCounters {
        injected: get(base),
        no_room: get(base + 1),
        stripped: get(base + 2),
        malformed: get(base + 3),
        mss_clamped: get(base + 4),
        table_full: get(base + 5),
        uoa_injected: get(base + 6),
        uoa_no_room: get(base + 7),
        uoa_stripped: get(base + 8),
        uoa_carriers: get(base + 9),
        unreadable: get(base + 10),
    }
}

/// Removes tc filters of the injector left on `interface` by a process that
/// died (before TCX; TCX links die with their process). Absent is fine.
pub fn detach_stale(interface: &str) {
    if has_tcx() {
        return;
    }
    for (name, at) in PROGRAMS.into_iter().chain([(BACKEND_EGRESS, TcAttachType::Egress)]) {
        let _ = tc::qdisc_detach_program(interface, at, name);
    }
}

/// How many of the injector's client-side programs run on `interface` now;
/// `None` when the kernel (or `tc`) could not say: nothing is to be done on
/// a guess.
pub fn running_programs(interface: &str) -> Option<usize> {
    let names = programs_on(interface)?;
    Some(PROGRAMS.iter().filter(|(name, _)| names.iter().any(|n| n == name)).count())
}

/// The names of the programs at the ingress and egress hooks of
/// `interface` (TCX links, or before TCX tc filters); `None` when either
/// listing fails.
fn programs_on(interface: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for (_, at) in PROGRAMS {
        if has_tcx() {
            let (_, programs) = SchedClassifier::query_tcx(interface, at).ok()?;
            names.extend(programs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)));
        } else {
            names.extend(tc_filter_programs(interface, at)?);
        }
    }
    Some(names)
}

/// The names of the BPF programs of the tc filters on `interface` at `at`
/// (before TCX), from `tc -j filter show`; `None` when `tc` fails or its
/// answer does not parse.
fn tc_filter_programs(interface: &str, at: TcAttachType) -> Option<Vec<String>> {
    let hook = if at == TcAttachType::Ingress { "ingress" } else { "egress" };
    let out = std::process::Command::new("tc")
        .args(["-j", "filter", "show", "dev", interface, hook])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_tc_filters(&String::from_utf8_lossy(&out.stdout))
}

/// The program names in `tc -j filter show` output: the kernel's name of the
/// program (`options.prog.name`), or else the filter's (`options.bpf_name`),
/// cut to the 15 characters the kernel keeps, as TCX queries give them.
/// An empty answer (no filter at all) is an empty list.
fn parse_tc_filters(json: &str) -> Option<Vec<String>> {
    if json.trim().is_empty() {
        return Some(Vec::new());
    }
    let serde_json::Value::Array(filters) = serde_json::from_str(json).ok()? else { return None };
    let name = |f: &serde_json::Value| {
        let name = f.pointer("/options/prog/name").or_else(|| f.pointer("/options/bpf_name"))?.as_str()?;
        Some(name.chars().take(15).collect::<String>())
    };
    Some(filters.iter().filter_map(name).collect())
}

/// The injector's programs attached to `interface` now, by name (TCX links;
/// before Linux 6.6, tc filters, as `tc` lists them): what a test checks is
/// gone after a stop or a crash.
pub fn attached_programs(interface: &str) -> Vec<String> {
    let names = programs_on(interface).unwrap_or_default();
    names.into_iter().filter(|n| n.starts_with("toa_lb_")).collect()
}

/// The counters of a pinned injector's slot (`toa-lb inject status`).
pub(crate) fn pinned_counters(dir: &Path, slot: u32) -> Result<InjectorCounters, InjectError> {
    let data = MapData::from_pin(dir.join("toa_lb_counters")).map_err(bpf_err("open toa_lb_counters"))?;
    let array = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(bpf_err("toa_lb_counters"))?;
    Ok(read_counters(&array, slot))
}

/// The listeners of a pinned injector (`toa-lb inject status`).
pub(crate) fn pinned_listeners(dir: &Path) -> Result<Vec<InjectListener>, InjectError> {
    let data = MapData::from_pin(dir.join("toa_lb_listeners")).map_err(bpf_err("open toa_lb_listeners"))?;
    let map = BpfHashMap::<_, RawKey, RawListener>::try_from(aya::maps::Map::HashMap(data))
        .map_err(bpf_err("toa_lb_listeners"))?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.map_err(bpf_err("read toa_lb_listeners"))?;
        out.push(from_raw(&key, &value));
    }
    out.sort_by_key(|l| l.slot);
    Ok(out)
}

fn from_raw(key: &RawKey, value: &RawListener) -> InjectListener {
    let port = u16::from_be_bytes(key.port);
    let ip = if key.family == 4 {
        std::net::IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        std::net::IpAddr::from(key.addr)
    };
    let format = match (value.kind4, value.kind6) {
        (200, _) => Format::Tencent,
        (_, 253) => Format::AliV6,
        _ => Format::Toa,
    };
    let uoa = value.mode == 3;
    InjectListener {
        vip: SocketAddr::new(ip, port),
        protocol: if key.proto == 17 { Protocol::Udp } else { Protocol::Tcp },
        slot: value.slot,
        mode: match value.mode {
            1 => ObtainClientIp::Toa(format),
            2 => ObtainClientIp::Transparent,
            3 => ObtainClientIp::Uoa {
                format: if value.kind4 == 1 {
                    toa_core::uoa::UoaFormat::Ipo
                } else {
                    toa_core::uoa::UoaFormat::Opp
                },
                datagrams: value.placement,
            },
            _ => ObtainClientIp::Off,
        },
        // A UOA listener's placement byte holds its datagrams.
        placement: if uoa {
            Placement::default()
        } else {
            Placement {
                syn: value.placement & PLACE_SYN != 0,
                handshake_ack: value.placement & PLACE_ACK != 0,
                data: value.placement & PLACE_DATA != 0,
            }
        },
        clamp_mss: !uoa && value.placement & PLACE_CLAMP != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_filter_listing_names_the_programs() {
        // `tc -j filter show dev lb-c ingress` with the injector attached (iproute2 6.x).
        let json = r#"[{"protocol":"all","pref":49152,"kind":"bpf","chain":0},{"protocol":"all","pref":49152,"kind":"bpf","chain":0,"options":{"handle":"0x1","bpf_name":"toa_lb_ingress","direct-action":true,"not_in_hw":true,"prog":{"id":23038,"name":"toa_lb_ingress","tag":"1fe1fbfa8c03c381","jited":1}}}]"#;
        assert_eq!(parse_tc_filters(json).unwrap(), ["toa_lb_ingress"]);
        // Without the program's own name, the filter's, cut as the kernel cuts names.
        let json = r#"[{"kind":"bpf","options":{"bpf_name":"toa_lb_backend_egress"}}]"#;
        assert_eq!(parse_tc_filters(json).unwrap(), ["toa_lb_backend_"]);
        assert_eq!(parse_tc_filters("").unwrap(), Vec::<String>::new(), "no filter at all");
        assert_eq!(parse_tc_filters("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_tc_filters("Error: something"), None, "not an answer: no guess");
    }

    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(size_of::<RawKey>(), 20);
        assert_eq!(size_of::<RawListener>(), 8);
        assert_eq!(size_of::<RawConfig>(), 24 + 256 + 8);
    }

    #[test]
    fn listeners_round_trip_through_the_raw_form() {
        for (vip, protocol, mode) in [
            ("203.0.113.10:80", Protocol::Tcp, ObtainClientIp::Toa(Format::Toa)),
            ("[2001:db8::10]:443", Protocol::Tcp, ObtainClientIp::Toa(Format::AliV6)),
            ("203.0.113.10:80", Protocol::Tcp, ObtainClientIp::Toa(Format::Tencent)),
            ("203.0.113.10:53", Protocol::Udp, ObtainClientIp::Transparent),
            ("203.0.113.10:8080", Protocol::Tcp, ObtainClientIp::Off),
        ] {
            let l = InjectListener {
                vip: vip.parse().unwrap(),
                protocol,
                slot: 7,
                mode,
                placement: Placement { syn: false, handshake_ack: true, data: true },
                clamp_mss: protocol == Protocol::Tcp,
            };
            assert_eq!(from_raw(&raw_key(l.vip, protocol), &raw_listener(&l)), l);
        }
        for format in [toa_core::uoa::UoaFormat::Opp, toa_core::uoa::UoaFormat::Ipo] {
            let l = InjectListener {
                vip: "203.0.113.10:53".parse().unwrap(),
                protocol: Protocol::Udp,
                slot: 3,
                mode: ObtainClientIp::Uoa { format, datagrams: 5 },
                placement: Placement::default(),
                clamp_mss: false,
            };
            let raw = raw_listener(&l);
            assert_eq!((raw.mode, raw.placement), (3, 5));
            assert_eq!(from_raw(&raw_key(l.vip, Protocol::Udp), &raw), l);
        }
        let raw = raw_key("203.0.113.10:80".parse().unwrap(), Protocol::Tcp);
        assert_eq!(
            (raw.addr[..4].to_vec(), raw.port, raw.family, raw.proto),
            (vec![203, 0, 113, 10], [0, 80], 4, 6)
        );
    }

    #[test]
    fn strip_table_covers_every_format_and_the_companions() {
        let k = kind_formats();
        assert_eq!(k[254], 0b11, "toa and toa6");
        assert_eq!(k[253], 0b100);
        assert_eq!(k[200], 0b1000);
        assert_eq!(k[28], 0b1_0000);
        assert_eq!((k[201], k[202]), (FMT_COMPANION, FMT_COMPANION));
        assert_eq!(k.iter().filter(|b| **b != 0).count(), 6);
    }

    #[test]
    fn the_object_has_every_program_and_map() {
        let text = String::from_utf8_lossy(OBJECT);
        for name in PROGRAMS.iter().map(|(p, _)| *p).chain([BACKEND_EGRESS]).chain(MAPS) {
            assert!(text.contains(name), "{name} missing from bpf/inject.bpf.o");
        }
    }
}
