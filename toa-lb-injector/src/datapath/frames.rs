//! What the user-space drivers ([`super::ring`], [`super::pnet`]) share: ARP
//! and NDP for the VIPs and SNAT addresses, MAC learning for the next hop,
//! the frame handling around the engine.
//!
//! IPv6 next hops are found with NDP: neighbour solicitations for the VIPs and
//! SNAT addresses are answered, and unknown next hops are solicited.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pnet_datalink::NetworkInterface;

use crate::engine::{Engine, Verdict};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_ARP: u16 = 0x0806;

/// What can stop the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// No such interface.
    #[error("interface {0} not found; run `ip link` (interfaces here: {1})")]
    NoInterface(String, String),
    /// The interface has no MAC (not Ethernet).
    #[error("interface {0} has no Ethernet address")]
    NoMac(String),
    /// A VIP outside every network configured on the client interface.
    #[error("VIP {0} is not on interface {1} (its networks: {2}); add an address of that network to it")]
    VipNotOnInterface(IpAddr, String, String),
    /// The socket could not be opened.
    #[error("AF_PACKET on {0}: {1} (toa-lb needs root)")]
    Open(String, std::io::Error),
}

/// The set of addresses `toa-lb` answers ARP and NDP for (VIPs and SNAT
/// addresses); a reload replaces it.
pub type Owned = Arc<RwLock<HashSet<IpAddr>>>;

/// One interface, as the frame logic needs it.
#[derive(Debug)]
pub(crate) struct PortInfo {
    pub(crate) name: String,
    pub(crate) index: u32,
    pub(crate) mac: [u8; 6],
    /// An IPv4 address of the port, used as the sender of ARP requests.
    pub(crate) ip: Option<Ipv4Addr>,
    /// An IPv6 address of the port, used as the source of neighbour solicitations.
    pub(crate) ip6: Option<Ipv6Addr>,
}

impl PortInfo {
    pub(crate) fn new(interface: &NetworkInterface) -> Result<Self, DatapathError> {
        let mac = interface.mac.ok_or_else(|| DatapathError::NoMac(interface.name.clone()))?.octets();
        let ip = interface.ips.iter().find_map(|n| match n.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        });
        // A global address if there is one: the peers' on-link prefix.
        let ip6 = interface
            .ips
            .iter()
            .filter_map(|n| match n.ip() {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            })
            .min_by_key(|ip| ip.is_unicast_link_local());
        Ok(PortInfo { name: interface.name.clone(), index: interface.index, mac, ip, ip6 })
    }
}

/// What every datapath thread shares: the two ports (0 faces clients, 1
/// backends), the neighbour table, the owned addresses, the clock.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) ports: [PortInfo; 2],
    neighbors: Mutex<HashMap<IpAddr, [u8; 6]>>,
    owned: Owned,
    pub(crate) start: Instant,
}

impl Link {
    pub(crate) fn new(ports: [PortInfo; 2], owned: Owned) -> Self {
        Link { ports, neighbors: Mutex::new(HashMap::new()), owned, start: Instant::now() }
    }

    fn owns(&self, ip: IpAddr) -> bool {
        self.owned.read().is_ok_and(|owned| owned.contains(&ip))
    }

    fn learn(&self, ip: IpAddr, mac: [u8; 6]) {
        if let Ok(mut n) = self.neighbors.lock() {
            n.insert(ip, mac);
        }
    }
}

/// Where the frame logic sends frames: port 0 or 1.
pub(crate) trait Transmit {
    fn transmit(&mut self, side: usize, frame: &[u8]);
}

/// Frames for a next hop whose MAC is being asked for (ARP, NDP): sent once
/// it answers, as the kernel's queue of unresolved neighbours does, so that
/// the first packets of a flow to a backend not heard from yet are not lost
/// (TCP would retransmit its SYN a second later; a UDP datagram, and the UOA
/// carrier ahead of it, would be gone).
struct Held {
    side: usize,
    next_hop: IpAddr,
    since: Instant,
    /// Ethernet frames, their MACs still to write.
    frames: Vec<Vec<u8>>,
}

/// Frames held per next hop (the kernel's `unres_qlen` is a few frames too);
/// later ones are dropped.
const HOLD_FRAMES: usize = 8;
/// Next hops with held frames, per thread; frames for more are dropped.
const HOLD_HOPS: usize = 64;
/// How long frames wait for an answer before they are dropped.
const HOLD_FOR: Duration = Duration::from_secs(1);

/// A thread's view of the neighbour table: its own cache in front of the
/// shared one, so that learning and looking up cost no lock per packet; and
/// the frames it holds for next hops being asked for.
pub(crate) struct Neighbors<'a> {
    link: &'a Link,
    cache: HashMap<IpAddr, [u8; 6]>,
    held: Vec<Held>,
}

impl<'a> Neighbors<'a> {
    pub(crate) fn new(link: &'a Link) -> Self {
        Neighbors { link, cache: HashMap::new(), held: Vec::new() }
    }

    /// Holds `frames` for `next_hop` until [`Neighbors::release`] finds its
    /// MAC. Returns whether the next hop is newly asked for (the caller
    /// sends the request); `false` also when the frames had to be dropped.
    fn hold(&mut self, side: usize, next_hop: IpAddr, frames: Vec<Vec<u8>>) -> bool {
        if let Some(held) = self.held.iter_mut().find(|h| h.next_hop == next_hop && h.side == side) {
            let room = HOLD_FRAMES.saturating_sub(held.frames.len());
            held.frames.extend(frames.into_iter().take(room));
            return false;
        }
        if self.held.len() >= HOLD_HOPS {
            return false;
        }
        let frames = frames.into_iter().take(HOLD_FRAMES).collect();
        self.held.push(Held { side, next_hop, since: Instant::now(), frames });
        true
    }

    /// Sends the held frames whose next hop's MAC is known now (another
    /// thread may have heard the answer), and drops those held longer than
    /// [`HOLD_FOR`]. Costs nothing when nothing is held.
    pub(crate) fn release(&mut self, tx: &mut impl Transmit) {
        if self.held.is_empty() {
            return;
        }
        let mut held = std::mem::take(&mut self.held);
        held.retain_mut(|h| {
            let Some(mac) = self.lookup(h.next_hop) else { return h.since.elapsed() < HOLD_FOR };
            for frame in &mut h.frames {
                frame[0..6].copy_from_slice(&mac);
                frame[6..12].copy_from_slice(&self.link.ports[h.side].mac);
                tx.transmit(h.side, frame);
            }
            false
        });
        self.held = held;
    }

    /// Records `ip` at `mac` (seen as a frame's source).
    fn learn(&mut self, ip: IpAddr, mac: [u8; 6]) {
        if self.cache.get(&ip) != Some(&mac) {
            self.cache.insert(ip, mac);
            self.link.learn(ip, mac);
        }
    }

    fn lookup(&mut self, ip: IpAddr) -> Option<[u8; 6]> {
        if let Some(mac) = self.cache.get(&ip) {
            return Some(*mac);
        }
        let mac = self.link.neighbors.lock().ok()?.get(&ip).copied()?;
        self.cache.insert(ip, mac);
        Some(mac)
    }
}

/// Finds an interface by name.
pub fn interface(name: &str) -> Result<NetworkInterface, DatapathError> {
    let all = pnet_datalink::interfaces();
    match all.iter().find(|i| i.name == name) {
        Some(i) => Ok(i.clone()),
        None => {
            let names = all.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ");
            Err(DatapathError::NoInterface(name.to_owned(), names))
        }
    }
}

/// Checks that every VIP lies in a network of the client interface.
pub fn check_vips(client: &NetworkInterface, vips: &[IpAddr]) -> Result<(), DatapathError> {
    for vip in vips {
        if !client.ips.iter().any(|net| net.contains(*vip)) {
            let nets = client.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            return Err(DatapathError::VipNotOnInterface(*vip, client.name.clone(), nets));
        }
    }
    Ok(())
}

/// Handles one Ethernet frame received on port `side` in `buf[..len]` (with
/// 64 spare bytes): ARP and NDP for the owned addresses, IP through `engine`,
/// out through `tx` with the next hop's MAC.
pub(crate) fn handle_frame(
    link: &Link,
    neighbors: &mut Neighbors<'_>,
    engine: &mut Engine,
    side: usize,
    buf: &mut [u8],
    len: usize,
    tx: &mut impl Transmit,
) {
    let port = &link.ports[side];
    let src_mac: [u8; 6] = buf[6..12].try_into().unwrap_or_default();
    if src_mac == port.mac {
        return; // our own frame, seen on its way out
    }
    let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
    match ethertype {
        ETHERTYPE_ARP => handle_arp(link, side, &buf[14..len], tx),
        ETHERTYPE_IPV6 if is_ndp(&buf[14..len]) => handle_ndp(link, side, &buf[14..len], src_mac, tx),
        ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => {
            if let Some(src) = ip_source(&buf[14..len]) {
                neighbors.learn(src, src_mac);
            }
            let verdict = engine.handle_packet(link.start.elapsed(), &mut buf[14..], len - 14);
            tracing::trace!(port = %port.name, ?verdict, "packet");
            let (out, ip_len, next_hop) = match verdict {
                Verdict::ToBackend { len, next_hop } => (1, len, next_hop),
                Verdict::ToClient { len, next_hop } => (0, len, next_hop),
                Verdict::Drop(_) | Verdict::NotMine => return,
            };
            match neighbors.lookup(next_hop) {
                Some(mac) => {
                    buf[0..6].copy_from_slice(&mac);
                    buf[6..12].copy_from_slice(&link.ports[out].mac);
                    // A UOA carrier first, in a frame of its own with the same link header.
                    if let Some(carrier) = engine.take_carrier() {
                        let mut frame = buf[..14].to_vec();
                        frame.extend_from_slice(&carrier);
                        tx.transmit(out, &frame);
                    }
                    tx.transmit(out, &buf[..14 + ip_len]);
                }
                // Unknown next hop: hold the frames (the carrier first) and ask.
                None => {
                    let mut frames = Vec::with_capacity(2);
                    if let Some(carrier) = engine.take_carrier() {
                        frames.push([&buf[..14], &carrier[..]].concat());
                    }
                    frames.push(buf[..14 + ip_len].to_vec());
                    if neighbors.hold(out, next_hop, frames) {
                        match next_hop {
                            IpAddr::V4(target) => tx.transmit(out, &arp_request(&link.ports[out], target)),
                            IpAddr::V6(target) => {
                                if let Some(frame) = neighbor_solicit(&link.ports[out], target) {
                                    tx.transmit(out, &frame);
                                }
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// The source address of an IP packet, read from its header alone (for MAC
/// learning; the engine validates the packet itself).
fn ip_source(ip: &[u8]) -> Option<IpAddr> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]))),
        6 if ip.len() >= 40 => Some(IpAddr::V6(v6(&ip[8..24]))),
        _ => None,
    }
}

/// Answers ARP requests for owned addresses; learns every sender.
fn handle_arp(link: &Link, side: usize, arp: &[u8], tx: &mut impl Transmit) {
    let port = &link.ports[side];
    // Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4.
    if arp.len() < 28 || arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return;
    }
    let op = u16::from_be_bytes([arp[6], arp[7]]);
    let sender_mac: [u8; 6] = arp[8..14].try_into().unwrap_or_default();
    let sender_ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let target_ip = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    link.learn(IpAddr::V4(sender_ip), sender_mac);
    if op == 1 && link.owns(IpAddr::V4(target_ip)) {
        let mut reply = Vec::with_capacity(42);
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(&port.mac);
        reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&port.mac);
        reply.extend_from_slice(&target_ip.octets());
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(&sender_ip.octets());
        tx.transmit(side, &reply);
    }
}

fn arp_request(port: &PortInfo, target: Ipv4Addr) -> Vec<u8> {
    let sender = port.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut request = Vec::with_capacity(42);
    request.extend_from_slice(&[0xff; 6]);
    request.extend_from_slice(&port.mac);
    request.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    request.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    request.extend_from_slice(&port.mac);
    request.extend_from_slice(&sender.octets());
    request.extend_from_slice(&[0; 6]);
    request.extend_from_slice(&target.octets());
    request
}

const ICMPV6: u8 = 58;
const NS: u8 = 135;
const NA: u8 = 136;

/// Whether an IPv6 packet is a neighbour solicitation or advertisement
/// (without extension headers, as NDP sends them).
fn is_ndp(ip: &[u8]) -> bool {
    ip.len() >= 40 + 24 && ip[6] == ICMPV6 && matches!(ip[40], NS | NA)
}

fn v6(bytes: &[u8]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes[..16]);
    Ipv6Addr::from(octets)
}

/// Answers solicitations for owned addresses; learns the link-layer address
/// of every sender (source link-layer option, or the frame's source MAC).
fn handle_ndp(link: &Link, side: usize, ip: &[u8], frame_src: [u8; 6], tx: &mut impl Transmit) {
    let port = &link.ports[side];
    let src = v6(&ip[8..24]);
    let target = v6(&ip[48..64]);
    if ip[40] == NA {
        link.learn(IpAddr::V6(target), frame_src);
        return;
    }
    if !src.is_unspecified() {
        link.learn(IpAddr::V6(src), frame_src);
    }
    if !link.owns(IpAddr::V6(target)) || src.is_unspecified() {
        return;
    }
    // Neighbour advertisement: solicited + override, target link-layer option.
    let mut icmp = vec![NA, 0, 0, 0, 0x60, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&port.mac);
    tx.transmit(side, &ndp_frame(frame_src, port.mac, target, src, icmp));
}

/// Solicits `target` from the port's IPv6 address, at its solicited-node multicast group.
fn neighbor_solicit(port: &PortInfo, target: Ipv6Addr) -> Option<Vec<u8>> {
    let src = port.ip6?;
    let t = target.octets();
    let group =
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let g = group.octets();
    let mac = [0x33, 0x33, g[12], g[13], g[14], g[15]];
    let mut icmp = vec![NS, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&port.mac);
    Some(ndp_frame(mac, port.mac, src, group, icmp))
}

/// An Ethernet frame with an IPv6 header (hop limit 255, as NDP requires)
/// around `icmp`, whose checksum is filled in.
fn ndp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let mut sum = toa_core::checksum::Accumulator::new();
    sum.add_ipv6_pseudo_header(src, dst, ICMPV6, icmp.len() as u32);
    sum.add_bytes(&icmp);
    let csum = sum.finish();
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[ICMPV6, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sent(Vec<(usize, Vec<u8>)>);

    impl Transmit for Sent {
        fn transmit(&mut self, side: usize, frame: &[u8]) {
            self.0.push((side, frame.to_vec()));
        }
    }

    fn link() -> Link {
        let port = |index: u32, last: u8| PortInfo {
            name: format!("p{index}"),
            index,
            mac: [2, 0, 0, 0, 0, last],
            ip: Some(Ipv4Addr::new(100, 125, 0, last)),
            ip6: None,
        };
        Link::new([port(1, 1), port(2, 2)], Arc::new(RwLock::new(HashSet::new())))
    }

    /// An Ethernet frame with its MACs still zero and `tag` as its payload.
    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.push(tag);
        f
    }

    #[test]
    fn frames_for_an_unknown_next_hop_wait_for_its_answer() {
        let link = link();
        let mut neighbors = Neighbors::new(&link);
        let backend: IpAddr = "100.125.2.1".parse().unwrap();
        let mut sent = Sent::default();
        // A carrier and its datagram: the next hop is new, ask for it.
        assert!(neighbors.hold(1, backend, vec![frame(1), frame(2)]));
        // More for the same next hop: held too, no second request.
        assert!(!neighbors.hold(1, backend, vec![frame(3)]));
        neighbors.release(&mut sent);
        assert!(sent.0.is_empty(), "no answer yet");
        // Another thread hears the answer.
        let mac = [2, 0, 0, 0, 2, 1];
        link.learn(backend, mac);
        neighbors.release(&mut sent);
        let tags: Vec<u8> = sent.0.iter().map(|(_, f)| f[14]).collect();
        assert_eq!(tags, [1, 2, 3], "in the order they came");
        for (side, f) in &sent.0 {
            assert_eq!((*side, &f[0..6], &f[6..12]), (1, &mac[..], &link.ports[1].mac[..]));
        }
        sent.0.clear();
        neighbors.release(&mut sent);
        assert!(sent.0.is_empty(), "sent once");
    }

    #[test]
    fn held_frames_are_bounded_and_expire() {
        let link = link();
        let mut neighbors = Neighbors::new(&link);
        let mut sent = Sent::default();
        let hop = |i: usize| IpAddr::V4(Ipv4Addr::new(100, 125, 3, i as u8));
        assert!(neighbors.hold(1, hop(0), (0..20).map(|i| frame(i as u8)).collect()));
        assert_eq!(neighbors.held[0].frames.len(), HOLD_FRAMES);
        assert!(!neighbors.hold(1, hop(0), vec![frame(99)]), "full: dropped");
        assert_eq!(neighbors.held[0].frames.len(), HOLD_FRAMES);
        for i in 1..HOLD_HOPS {
            assert!(neighbors.hold(1, hop(i), vec![frame(0)]));
        }
        assert!(!neighbors.hold(1, hop(HOLD_HOPS), vec![frame(0)]), "too many next hops: dropped");
        assert_eq!(neighbors.held.len(), HOLD_HOPS);
        // Unanswered for longer than HOLD_FOR: dropped, nothing sent.
        for held in &mut neighbors.held {
            held.since = Instant::now() - HOLD_FOR;
        }
        neighbors.release(&mut sent);
        assert!(neighbors.held.is_empty() && sent.0.is_empty());
    }
}
