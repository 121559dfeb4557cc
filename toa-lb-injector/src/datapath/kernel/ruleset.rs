//! The kernel datapath's nftables table, `inet toa_lb`, rendered from the
//! listeners as they run.
//!
//! ```text
//! pre_nat      prerouting dstnat  a new flow without the injector's GATE_MARK: not
//!                                 balanced; proto . VIP . port -> jump l<slot>
//!   l<slot>      ct timeout by the configuration; ct mark := the scheduler's backend
//!                (numgen for round robin and weights, jhash of the client for
//!                consistent hash); count the flow; dnat to the backend of that mark
//! post_nat     postrouting srcnat  GATE_MARK cleared; a flow of ours without the
//!              injector's transparent mark: snat to the pool, fully-random
//! forward_count forward -150     packets and bytes per backend and direction
//! input_guard   input -10        new flows to the host on a VIP or SNAT address: dropped
//! ```
//!
//! Backends are known by a conntrack mark, `MARK_BASE | id`, that stays the
//! same while the process runs (so do their named counters); listeners by a
//! slot, shared with the injector's counters. Every change is one `nft -f`
//! transaction that flushes what it re-renders: counters keep their values,
//! and new flows see either the old rules or the new ones.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::engine::ListenerKey;
use crate::engine::config::{Protocol, Scheduler, Timeouts};
use crate::engine::listeners::Listeners;

/// The table's name (family `inet`).
pub const TABLE: &str = "toa_lb";
/// The skb mark bit the injector sets on the TCP SYNs and UDP datagrams to
/// listeners it has handled: the table balances new flows only with it (a
/// SYN or datagram without it met no running injector: it would be balanced
/// without its TOA or UOA, and with a client's forged one). Cleared again in
/// `post_nat` for a flow's first packet; a UDP flow's later datagrams keep
/// it up to the interface (as they keep the transparent mark and the UOA
/// marks), so host policy routing must not match on it.
pub const GATE_MARK: u32 = 0x1000_0000;
/// The conntrack marks of `toa-lb`'s flows: this byte on top.
pub const MARK_BASE: u32 = 0x7a00_0000;
/// The mask of [`MARK_BASE`].
pub const MARK_MASK: u32 = 0xff00_0000;
/// Buckets of the consistent-hash scheduler.
const HASH_BUCKETS: u32 = 256;
/// Its jhash seed: fixed, so that a restart maps clients as before.
const HASH_SEED: u32 = 0x746f_616c;

/// The numbers that name things in the table.
///
/// Backend ids outlive the process: a restart keeps established flows (their
/// conntrack entries carry the old run's marks), so the next run must give
/// each backend the id it had, or their traffic would be counted to another
/// backend (one a changed configuration put in its place). They are written
/// to a file ([`Ids::to_text`]) and read at start ([`Ids::from_text`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// Listener slot, by key (also the injector's counter slot).
    pub slots: BTreeMap<ListenerKey, u32>,
    /// Backend id (its conntrack mark is `MARK_BASE | id`), by listener and address.
    pub backends: BTreeMap<(ListenerKey, SocketAddr), u32>,
}

impl Ids {
    /// Gives every listener and backend of `listeners` a number, keeping those they have.
    pub fn assign(&mut self, listeners: &Listeners) -> Result<(), String> {
        for l in listeners.all() {
            if !self.slots.contains_key(&l.key()) {
                let slot = (0..super::injector::MAX_LISTENERS)
                    .find(|s| !self.slots.values().any(|v| v == s))
                    .ok_or("too many listeners")?;
                self.slots.insert(l.key(), slot);
            }
            for b in &l.config.backends {
                let next = self.backends.values().max().map_or(1, |m| m + 1);
                if next >= 1 << 24 {
                    return Err("too many backends over this process's life".into());
                }
                self.backends.entry((l.key(), b.addr)).or_insert(next);
            }
        }
        Ok(())
    }

    /// Forgets the slots of listeners that are gone (a reload), so that they
    /// can be reused; backend ids stay (their flows and counters go on).
    pub fn retain_listeners(&mut self, listeners: &Listeners) {
        self.slots.retain(|key, _| listeners.find(*key).is_some());
    }

    /// Backend ids as a previous run left them, for a new run: only those of
    /// backends still configured or whose mark has flows in conntrack (`live`),
    /// so that the list does not grow with every backend ever seen. Listener
    /// slots are not kept (the injector's counters start again anyway).
    pub fn carried_over(previous: &Ids, listeners: &Listeners, live: impl Fn(u32) -> bool) -> Ids {
        let configured = |key: &ListenerKey, addr: &SocketAddr| {
            listeners.find(*key).is_some_and(|i| {
                listeners.get(i).is_some_and(|l| l.config.backends.iter().any(|b| b.addr == *addr))
            })
        };
        let backends = previous
            .backends
            .iter()
            .filter(|((key, addr), id)| configured(key, addr) || live(MARK_BASE | **id))
            .map(|(k, id)| (*k, *id))
            .collect();
        Ids { slots: BTreeMap::new(), backends }
    }

    /// The backend ids, a line each: `backend tcp|udp VIP ADDRESS ID`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (((protocol, vip), addr), id) in &self.backends {
            let _ = writeln!(out, "backend {} {vip} {addr} {id}", proto(*protocol));
        }
        out
    }

    /// Reads [`Ids::to_text`]'s lines; others are skipped (a file from
    /// another version), and so are ids out of range or given twice.
    pub fn from_text(text: &str) -> Ids {
        let mut ids = Ids::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let ["backend", protocol, vip, addr, id] = words[..] else { continue };
            let protocol = match protocol {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => continue,
            };
            let (Ok(vip), Ok(addr), Ok(id)) = (vip.parse(), addr.parse(), id.parse::<u32>()) else {
                continue;
            };
            if id == 0 || id >= 1 << 24 || ids.backends.values().any(|v| *v == id) {
                continue;
            }
            ids.backends.insert(((protocol, vip), addr), id);
        }
        ids
    }
}

/// What the table is rendered from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The listeners as they run.
    pub listeners: &'a Listeners,
    /// The SNAT pool.
    pub snat: &'a [IpAddr],
    /// Conntrack timeouts of new flows.
    pub timeouts: Timeouts,
    /// The skb mark bit the injector sets on transparent flows.
    pub transparent_mark: u32,
}

fn family(addr: IpAddr) -> (&'static str, &'static str) {
    if addr.is_ipv4() { ("ip", "ipv4_addr") } else { ("ip6", "ipv6_addr") }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `addr . port` as an nft map value.
fn endpoint(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{} . {}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("{} . {}", a.ip(), a.port()),
    }
}

/// The timeouts object for a protocol and family (named by its values, so a
/// reload with other timeouts makes a new one and flows keep theirs).
fn timeout_object(p: Protocol, v4: bool, t: &Timeouts) -> (String, String) {
    let (syn, est, closing, udp) = (
        t.syn.as_secs().max(1),
        t.established.as_secs().max(1),
        t.closing.as_secs().max(1),
        t.udp.as_secs().max(1),
    );
    let l3 = if v4 { "ip" } else { "ip6" };
    match p {
        Protocol::Tcp => (
            format!("tcp{}_{syn}_{est}_{closing}", if v4 { 4 } else { 6 }),
            format!(
                "protocol tcp; l3proto {l3}; policy = {{ syn_sent : {syn}, syn_recv : {syn}, established : {est}, fin_wait : {closing}, close_wait : {closing}, last_ack : {closing}, time_wait : {closing}, close : 1 }};"
            ),
        ),
        Protocol::Udp => (
            format!("udp{}_{udp}", if v4 { 4 } else { 6 }),
            format!("protocol udp; l3proto {l3}; policy = {{ unreplied : {udp}, replied : {udp} }};"),
        ),
    }
}

/// The scheduler's `ct mark set` expression over the eligible backends
/// (`(backend index, id, weight)`), or `None` when none is eligible.
fn schedule(
    scheduler: Scheduler,
    v4: bool,
    backends: &[crate::engine::config::Backend],
    eligible: &[(usize, u32)],
) -> Option<String> {
    if eligible.is_empty() {
        return None;
    }
    let mark = |id: u32| format!("{:#010x}", MARK_BASE | id);
    Some(match scheduler {
        Scheduler::RoundRobin => {
            let elements: Vec<String> =
                eligible.iter().enumerate().map(|(i, (_, id))| format!("{i} : {}", mark(*id))).collect();
            format!("numgen inc mod {} map {{ {} }}", eligible.len(), elements.join(", "))
        }
        Scheduler::WeightedRoundRobin => {
            let mut at = 0u32;
            let mut elements = Vec::new();
            for (index, id) in eligible {
                let weight = backends[*index].weight.max(1);
                let range = if weight == 1 { format!("{at}") } else { format!("{at}-{}", at + weight - 1) };
                elements.push(format!("{range} : {}", mark(*id)));
                at += weight;
            }
            format!("numgen inc mod {at} map {{ {} }}", elements.join(", "))
        }
        Scheduler::ConsistentHash => {
            // Rendezvous hashing per bucket: removing a backend moves only its buckets.
            let eligible_index = |i: usize| eligible.iter().any(|(b, _)| *b == i);
            let owner = |bucket: u32| {
                let b = crate::engine::rendezvous(bucket, backends, eligible_index).unwrap_or(eligible[0].0);
                eligible.iter().find(|(i, _)| *i == b).map_or(eligible[0].1, |(_, id)| *id)
            };
            let mut elements = Vec::new();
            let mut start = 0;
            while start < HASH_BUCKETS {
                let id = owner(start);
                let mut end = start;
                while end + 1 < HASH_BUCKETS && owner(end + 1) == id {
                    end += 1;
                }
                let range = if start == end { format!("{start}") } else { format!("{start}-{end}") };
                elements.push(format!("{range} : {}", mark(id)));
                start = end + 1;
            }
            let l3 = if v4 { "ip" } else { "ip6" };
            format!(
                "jhash {l3} saddr . th sport mod {HASH_BUCKETS} seed {HASH_SEED:#x} map {{ {} }}",
                elements.join(", ")
            )
        }
    })
}

/// Renders the transaction that brings the table to `inputs`: declarations
/// (idempotent `add`s: counters keep their values), flushes of what is
/// re-rendered, deletion of the listener chains in `stale_chains`, then the
/// rules and elements. Returns the script and the listener chains it made.
pub fn render(inputs: &Inputs<'_>, ids: &Ids, stale_chains: &[String]) -> (String, Vec<String>) {
    let t = format!("inet {TABLE}");
    let mut s = String::new();
    let mut rules = String::new();
    let _ = writeln!(s, "add table {t}");
    // Objects.
    for id in ids.backends.values() {
        for suffix in ["f", "o", "r"] {
            let _ = writeln!(s, "add counter {t} b{id}_{suffix}");
        }
    }
    for slot in ids.slots.values() {
        let _ = writeln!(s, "add counter {t} l{slot}_nobackend");
    }
    let mut timeouts = BTreeMap::new();
    for l in inputs.listeners.configs() {
        let (name, body) = timeout_object(l.protocol, l.vip.is_ipv4(), &inputs.timeouts);
        timeouts.insert(name, body);
    }
    for (name, body) in &timeouts {
        let _ = writeln!(s, "add ct timeout {t} {name} {{ {body} }}");
    }
    // Sets and maps, emptied and filled again.
    let maps = [
        ("vip4", "inet_proto . ipv4_addr . inet_service : verdict"),
        ("vip6", "inet_proto . ipv6_addr . inet_service : verdict"),
        ("flows", "mark : counter"),
        ("traffic", "ct_dir . mark : counter"),
    ];
    for (name, kind) in maps {
        let _ = writeln!(s, "add map {t} {name} {{ type {kind}; }}");
    }
    let sets =
        [("vips4", "ipv4_addr"), ("vips6", "ipv6_addr"), ("snat4", "ipv4_addr"), ("snat6", "ipv6_addr")];
    for (name, kind) in sets {
        let _ = writeln!(s, "add set {t} {name} {{ type {kind}; }}");
    }
    // Chains.
    let base = [
        ("pre_nat", "type nat hook prerouting priority dstnat; policy accept;"),
        ("post_nat", "type nat hook postrouting priority srcnat; policy accept;"),
        ("forward_count", "type filter hook forward priority -150; policy accept;"),
        ("input_guard", "type filter hook input priority -10; policy accept;"),
    ];
    for (name, hook) in base {
        let _ = writeln!(s, "add chain {t} {name} {{ {hook} }}");
        let _ = writeln!(s, "flush chain {t} {name}");
    }
    for (name, _) in maps {
        let _ = writeln!(s, "flush map {t} {name}");
    }
    for (name, _) in sets {
        let _ = writeln!(s, "flush set {t} {name}");
    }
    let mut chains = Vec::new();
    for l in inputs.listeners.all() {
        let Some(slot) = ids.slots.get(&l.key()) else { continue };
        let chain = format!("l{slot}");
        let _ = writeln!(s, "add chain {t} {chain}");
        let _ = writeln!(s, "flush chain {t} {chain}");
        chains.push(chain);
    }
    for stale in stale_chains.iter().filter(|c| !chains.contains(c)) {
        let _ = writeln!(s, "delete chain {t} {stale}");
    }

    // Elements.
    for ((key, addr), id) in &ids.backends {
        let mark = MARK_BASE | id;
        let _ = writeln!(rules, "add element {t} flows {{ {mark:#010x} : \"b{id}_f\" }}");
        let _ = writeln!(
            rules,
            "add element {t} traffic {{ original . {mark:#010x} : \"b{id}_o\", reply . {mark:#010x} : \"b{id}_r\" }}"
        );
        let _ = (key, addr);
    }
    for l in inputs.listeners.all() {
        let Some(slot) = ids.slots.get(&l.key()) else { continue };
        let vip = l.config.vip;
        let v4 = vip.is_ipv4();
        let (ip, _) = family(vip.ip());
        let tuple = format!("{} . {} . {}", proto(l.config.protocol), vip.ip(), vip.port());
        let n = if v4 { 4 } else { 6 };
        let _ = writeln!(rules, "add element {t} vip{n} {{ {tuple} : jump l{slot} }}");
        let _ = writeln!(rules, "add element {t} vips{n} {{ {} }}", vip.ip());
        // The listener's chain.
        let (name, _) = timeout_object(l.config.protocol, v4, &inputs.timeouts);
        let _ = writeln!(rules, "add rule {t} l{slot} ct timeout set \"{name}\"");
        let eligible: Vec<(usize, u32)> = l
            .config
            .backends
            .iter()
            .enumerate()
            .filter(|(i, _)| l.eligible(*i))
            .filter_map(|(i, b)| ids.backends.get(&(l.key(), b.addr)).map(|id| (i, *id)))
            .collect();
        match schedule(l.config.scheduler, v4, &l.config.backends, &eligible) {
            Some(pick) => {
                let targets: Vec<String> = eligible
                    .iter()
                    .map(|(i, id)| {
                        format!("{:#010x} : {}", MARK_BASE | id, endpoint(l.config.backends[*i].addr))
                    })
                    .collect();
                let _ = writeln!(rules, "add rule {t} l{slot} ct mark set {pick}");
                let _ = writeln!(rules, "add rule {t} l{slot} counter name ct mark map @flows");
                let _ = writeln!(
                    rules,
                    "add rule {t} l{slot} meta l4proto {} dnat {ip} to ct mark map {{ {} }}",
                    proto(l.config.protocol),
                    targets.join(", ")
                );
            }
            None => {
                let _ = writeln!(rules, "add rule {t} l{slot} counter name \"l{slot}_nobackend\" drop");
            }
        }
    }
    for addr in inputs.snat {
        let n = if addr.is_ipv4() { 4 } else { 6 };
        let _ = writeln!(rules, "add element {t} snat{n} {{ {addr} }}");
    }
    // Base chains. A new flow whose first packet the injector has not seen is
    // not balanced (no NAT: the host's own stack drops it in input_guard).
    let _ = writeln!(rules, "add rule {t} pre_nat meta mark & {GATE_MARK:#010x} == 0 return");
    let _ = writeln!(rules, "add rule {t} pre_nat meta l4proto . ip daddr . th dport vmap @vip4");
    let _ = writeln!(rules, "add rule {t} pre_nat meta l4proto . ip6 daddr . th dport vmap @vip6");
    let transparent = inputs.transparent_mark;
    let _ = writeln!(
        rules,
        "add rule {t} post_nat meta mark & {GATE_MARK:#010x} != 0 meta mark set meta mark & {:#010x}",
        !GATE_MARK
    );
    let _ = writeln!(rules, "add rule {t} post_nat ct mark & {MARK_MASK:#010x} != {MARK_BASE:#010x} return");
    let _ = writeln!(
        rules,
        "add rule {t} post_nat meta mark & {transparent:#010x} == {transparent:#010x} meta mark set meta mark & {:#010x} return",
        !transparent
    );
    let pool = |v4: bool| -> Option<String> {
        let addrs: Vec<String> =
            inputs.snat.iter().filter(|a| a.is_ipv4() == v4).map(ToString::to_string).collect();
        match addrs.len() {
            0 => None,
            1 => Some(addrs[0].clone()),
            n => {
                let elements: Vec<String> =
                    addrs.iter().enumerate().map(|(i, a)| format!("{i} : {a}")).collect();
                Some(format!("numgen random mod {n} map {{ {} }}", elements.join(", ")))
            }
        }
    };
    if let Some(p) = pool(true) {
        let _ = writeln!(rules, "add rule {t} post_nat meta nfproto ipv4 snat ip to {p} fully-random");
    }
    if let Some(p) = pool(false) {
        let _ = writeln!(rules, "add rule {t} post_nat meta nfproto ipv6 snat ip6 to {p} fully-random");
    }
    let _ = writeln!(rules, "add rule {t} forward_count counter name ct direction . ct mark map @traffic");
    let _ = writeln!(
        rules,
        "add rule {t} input_guard ct state new meta l4proto {{ tcp, udp }} ip daddr @vips4 drop"
    );
    let _ = writeln!(
        rules,
        "add rule {t} input_guard ct state new meta l4proto {{ tcp, udp }} ip6 daddr @vips6 drop"
    );
    let _ = writeln!(
        rules,
        "add rule {t} input_guard ct state new meta l4proto {{ tcp, udp }} ip daddr @snat4 drop"
    );
    let _ = writeln!(
        rules,
        "add rule {t} input_guard ct state new meta l4proto {{ tcp, udp }} ip6 daddr @snat6 drop"
    );
    s.push_str(&rules);
    (s, chains)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{Backend, ListenerConfig, ObtainClientIp, Placement};

    fn listener(
        vip: &str,
        protocol: Protocol,
        scheduler: Scheduler,
        backends: &[(&str, u32)],
    ) -> ListenerConfig {
        ListenerConfig {
            vip: vip.parse().unwrap(),
            protocol,
            backends: backends
                .iter()
                .map(|(a, weight)| Backend { addr: a.parse().unwrap(), weight: *weight })
                .collect(),
            scheduler,
            obtain_client_ip: ObtainClientIp::Toa(toa_core::Format::Toa),
            placement: Placement::default(),
            mss_clamp: Default::default(),
        }
    }

    fn render_for(configs: &[ListenerConfig]) -> (String, Ids) {
        let listeners = Listeners::new(configs);
        let mut ids = Ids::default();
        ids.assign(&listeners).unwrap();
        let snat: Vec<IpAddr> = vec![
            "100.125.1.1".parse().unwrap(),
            "100.125.1.2".parse().unwrap(),
            "2001:db8:64::1:1".parse().unwrap(),
        ];
        let inputs = Inputs {
            listeners: &listeners,
            snat: &snat,
            timeouts: Timeouts::default(),
            transparent_mark: 0x2000_0000,
        };
        (render(&inputs, &ids, &["l9".into()]).0, ids)
    }

    #[test]
    fn schedulers_become_maps() {
        let (s, ids) = render_for(&[
            listener(
                "203.0.113.10:80",
                Protocol::Tcp,
                Scheduler::RoundRobin,
                &[("100.125.2.1:8080", 1), ("100.125.2.2:8080", 1)],
            ),
            listener(
                "203.0.113.10:81",
                Protocol::Tcp,
                Scheduler::WeightedRoundRobin,
                &[("100.125.2.1:81", 3), ("100.125.2.2:81", 1)],
            ),
            listener(
                "[2001:db8:c::10]:53",
                Protocol::Udp,
                Scheduler::ConsistentHash,
                &[("[2001:db8:64::2:1]:53", 1), ("[2001:db8:64::2:2]:53", 1)],
            ),
        ]);
        assert_eq!(ids.backends.len(), 6);
        assert!(
            s.contains(
                "add rule inet toa_lb l0 ct mark set numgen inc mod 2 map { 0 : 0x7a000001, 1 : 0x7a000002 }"
            ),
            "{s}"
        );
        assert!(s.contains("ct mark set numgen inc mod 4 map { 0-2 : 0x7a000003, 3 : 0x7a000004 }"), "{s}");
        assert!(s.contains("meta l4proto tcp dnat ip to ct mark map { 0x7a000001 : 100.125.2.1 . 8080, 0x7a000002 : 100.125.2.2 . 8080 }"), "{s}");
        assert!(s.contains("ct mark set jhash ip6 saddr . th sport mod 256 seed"), "{s}");
        assert!(
            s.contains("meta l4proto udp dnat ip6 to ct mark map { 0x7a000005 : 2001:db8:64::2:1 . 53"),
            "{s}"
        );
        assert!(s.contains("add element inet toa_lb vip6 { udp . 2001:db8:c::10 . 53 : jump l2 }"), "{s}");
        assert!(
            s.contains(
                "snat ip to numgen random mod 2 map { 0 : 100.125.1.1, 1 : 100.125.1.2 } fully-random"
            ),
            "{s}"
        );
        assert!(s.contains("snat ip6 to 2001:db8:64::1:1 fully-random"), "{s}");
        assert!(
            s.contains("meta mark & 0x20000000 == 0x20000000 meta mark set meta mark & 0xdfffffff return"),
            "{s}"
        );
        assert!(s.contains("add ct timeout inet toa_lb tcp4_5_900_10 { protocol tcp; l3proto ip;"), "{s}");
        // The gate: new flows of both protocols, first in pre_nat.
        let gate = "add rule inet toa_lb pre_nat meta mark & 0x10000000 == 0 return\n";
        let at = |rule: &str| s.find(rule).unwrap_or_else(|| panic!("no {rule:?} in {s}"));
        assert!(at(gate) < at("add rule inet toa_lb pre_nat meta l4proto . ip daddr"), "{s}");
        assert!(s.contains("add rule inet toa_lb l2 ct timeout set \"udp6_60\""), "{s}");
        assert!(s.contains("delete chain inet toa_lb l9"), "{s}");
        // Flushes come before the rules that refill.
        assert!(
            s.find("flush map inet toa_lb vip4").unwrap() < s.find("add element inet toa_lb vip4").unwrap()
        );
    }

    #[test]
    fn consistent_hash_buckets_move_only_with_their_backend() {
        let backends: Vec<Backend> = (1..=4)
            .map(|i| Backend { addr: format!("100.125.2.{i}:80").parse().unwrap(), weight: 1 })
            .collect();
        let all: Vec<(usize, u32)> = (0..4).map(|i| (i, i as u32 + 1)).collect();
        let before = schedule(Scheduler::ConsistentHash, true, &backends, &all).unwrap();
        let without_3: Vec<(usize, u32)> = all.iter().copied().filter(|(i, _)| *i != 3).collect();
        let after = schedule(Scheduler::ConsistentHash, true, &backends, &without_3).unwrap();
        let owners = |expr: &str| -> Vec<u32> {
            let mut per_bucket = vec![0; HASH_BUCKETS as usize];
            let body = expr.split('{').nth(1).unwrap().trim_end_matches(" }").trim();
            for element in body.split(", ") {
                let (range, mark) = element.split_once(" : ").unwrap();
                let id = u32::from_str_radix(mark.trim_start_matches("0x"), 16).unwrap() & !MARK_MASK;
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b) = (a.parse::<usize>().expect(a), b.parse::<usize>().expect(b));
                per_bucket[a..=b].fill(id);
            }
            per_bucket
        };
        let (before, after) = (owners(&before), owners(&after));
        assert!(before.iter().all(|id| *id != 0), "every bucket owned");
        for id in 1..=4 {
            assert!(before.contains(&id), "backend {id} owns buckets");
        }
        for (b, a) in before.iter().zip(&after) {
            if *b != 4 {
                assert_eq!(a, b, "only backend 4's buckets move");
            }
        }
    }

    #[test]
    fn backend_ids_carry_over_to_the_next_run() {
        let a = listener("203.0.113.10:80", Protocol::Tcp, Scheduler::RoundRobin, &[("100.125.2.1:8080", 1)]);
        let b = listener(
            "[2001:db8:c::10]:53",
            Protocol::Udp,
            Scheduler::RoundRobin,
            &[("[2001:db8:64::2:1]:53", 1)],
        );
        let mut first = Ids::default();
        first.assign(&Listeners::new(&[a.clone(), b.clone()])).unwrap();
        let text = first.to_text();
        assert_eq!(
            text,
            "backend tcp 203.0.113.10:80 100.125.2.1:8080 1\nbackend udp [2001:db8:c::10]:53 [2001:db8:64::2:1]:53 2\n"
        );
        let read = Ids::from_text(&format!(
            "{text}garbage\nbackend tcp 203.0.113.10:80 100.125.2.9:1 2\nbackend tcp x y 9\n"
        ));
        assert_eq!(read.backends, first.backends, "a second id 2 and bad lines are skipped");
        // The next run's configuration puts a new listener first, and no longer
        // has the UDP one: the TCP backend keeps id 1, the UDP one's id stays
        // while its flows live, and the new backend takes a free id.
        let new =
            listener("203.0.113.10:443", Protocol::Tcp, Scheduler::RoundRobin, &[("100.125.2.2:443", 1)]);
        let listeners = Listeners::new(&[new, a]);
        let udp_mark = MARK_BASE | 2;
        let mut next = Ids::carried_over(&read, &listeners, |mark| mark == udp_mark);
        next.assign(&listeners).unwrap();
        let id = |vip: &str, addr: &str, p| {
            next.backends.get(&((p, vip.parse().unwrap()), addr.parse().unwrap())).copied()
        };
        assert_eq!(id("203.0.113.10:80", "100.125.2.1:8080", Protocol::Tcp), Some(1));
        assert_eq!(id("[2001:db8:c::10]:53", "[2001:db8:64::2:1]:53", Protocol::Udp), Some(2));
        assert_eq!(id("203.0.113.10:443", "100.125.2.2:443", Protocol::Tcp), Some(3));
        // Its flows gone, the unconfigured backend's id is forgotten.
        let later = Ids::carried_over(&next, &listeners, |_| false);
        assert_eq!(later.backends.len(), 2);
    }

    #[test]
    fn no_eligible_backend_drops() {
        let configs =
            [listener("203.0.113.10:80", Protocol::Tcp, Scheduler::RoundRobin, &[("100.125.2.1:8080", 1)])];
        let mut listeners = Listeners::new(&configs);
        listeners.drain(0, "100.125.2.1:8080".parse().unwrap(), true).unwrap();
        let mut ids = Ids::default();
        ids.assign(&listeners).unwrap();
        let inputs =
            Inputs { listeners: &listeners, snat: &[], timeouts: Timeouts::default(), transparent_mark: 1 };
        let (s, chains) = render(&inputs, &ids, &[]);
        assert_eq!(chains, ["l0"]);
        assert!(s.contains("add rule inet toa_lb l0 counter name \"l0_nobackend\" drop"), "{s}");
    }
}
