//! The pnet (AF_PACKET) driver around the engine: one thread per interface,
//! ARP for the VIPs and SNAT addresses, MAC learning for the next hop.
//!
//! IPv6 next hops are found with NDP: neighbour solicitations for the VIPs and
//! SNAT addresses are answered, and unknown next hops are solicited.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

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

struct Port {
    name: String,
    mac: [u8; 6],
    /// An IPv4 address of the port, used as the sender of ARP requests.
    ip: Option<Ipv4Addr>,
    /// An IPv6 address of the port, used as the source of neighbour solicitations.
    ip6: Option<Ipv6Addr>,
    tx: Mutex<Box<dyn DataLinkSender>>,
}

impl Port {
    fn send(&self, frame: &[u8]) {
        if let Ok(mut tx) = self.tx.lock() {
            let _ = tx.send_to(frame, None);
        }
    }
}

struct Shared {
    engine: Arc<Mutex<Engine>>,
    /// Next hops learnt from ARP and from received frames.
    neighbors: Mutex<HashMap<IpAddr, [u8; 6]>>,
    /// Addresses `toa-lb` answers ARP and NDP for: VIPs and SNAT addresses.
    owned: HashSet<IpAddr>,
    ports: [Port; 2],
    start: Instant,
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

fn open(interface: &NetworkInterface) -> Result<(Port, Box<dyn DataLinkReceiver>), DatapathError> {
    let mac = interface.mac.ok_or_else(|| DatapathError::NoMac(interface.name.clone()))?.octets();
    // Not promiscuous: the frames toa-lb needs are addressed to this MAC (its ARP
    // answers make sure of that) or broadcast.
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(200)),
        promiscuous: false,
        ..Default::default()
    };
    let (tx, rx) = match pnet_datalink::channel(interface, config) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        Ok(_) => {
            return Err(DatapathError::Open(interface.name.clone(), std::io::Error::other("not Ethernet")));
        }
        Err(e) => return Err(DatapathError::Open(interface.name.clone(), e)),
    };
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
    Ok((Port { name: interface.name.clone(), mac, ip, ip6, tx: Mutex::new(tx) }, rx))
}

/// Runs the datapath until `stop` is set: the calling thread serves the
/// client interface, a second thread the backend interface. `engine` is
/// shared with the control socket.
pub fn run(
    engine: Arc<Mutex<Engine>>,
    client: &NetworkInterface,
    backend: &NetworkInterface,
    owned: &[IpAddr],
    stop: Arc<AtomicBool>,
) -> Result<(), DatapathError> {
    let (client_port, client_rx) = open(client)?;
    let (backend_port, backend_rx) = open(backend)?;
    let owned = owned.iter().copied().collect();
    let shared = Arc::new(Shared {
        engine,
        neighbors: Mutex::new(HashMap::new()),
        owned,
        ports: [client_port, backend_port],
        start: Instant::now(),
    });
    let backend_thread = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || serve(&shared, 1, backend_rx, &stop))
    };
    serve(&shared, 0, client_rx, &stop);
    let _ = backend_thread.join();
    Ok(())
}

/// Serves port `side` (0 client, 1 backend).
fn serve(shared: &Shared, side: usize, mut rx: Box<dyn DataLinkReceiver>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536 + 64];
    let mut last_expiry = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if side == 0 && last_expiry.elapsed() > Duration::from_secs(1) {
            if let Ok(mut engine) = shared.engine.lock() {
                engine.poll_expired(shared.start.elapsed());
            }
            last_expiry = Instant::now();
        }
        let frame = match rx.next() {
            Ok(frame) => frame,
            Err(_) => continue, // read timeout: check `stop`
        };
        if frame.len() < 14 || frame.len() > buf.len() - 64 {
            continue;
        }
        let len = frame.len();
        buf[..len].copy_from_slice(frame);
        handle_frame(shared, side, &mut buf, len);
    }
}

fn handle_frame(shared: &Shared, side: usize, buf: &mut [u8], len: usize) {
    let port = &shared.ports[side];
    let src_mac: [u8; 6] = buf[6..12].try_into().unwrap_or_default();
    if src_mac == port.mac {
        return; // our own frame, seen on its way out
    }
    let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
    match ethertype {
        ETHERTYPE_ARP => handle_arp(shared, port, &buf[14..len]),
        ETHERTYPE_IPV6 if is_ndp(&buf[14..len]) => handle_ndp(shared, port, &buf[14..len], src_mac),
        ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => {
            if let Some(src) = ip_source(&buf[14..len]) {
                if let Ok(mut n) = shared.neighbors.lock() {
                    n.insert(src, src_mac);
                }
            }
            let verdict = match shared.engine.lock() {
                Ok(mut engine) => engine.handle_packet(shared.start.elapsed(), &mut buf[14..], len - 14),
                Err(_) => return,
            };
            tracing::trace!(port = %shared.ports[side].name, ?verdict, "packet");
            let (out, ip_len, next_hop) = match verdict {
                Verdict::ToBackend { len, next_hop } => (&shared.ports[1], len, next_hop),
                Verdict::ToClient { len, next_hop } => (&shared.ports[0], len, next_hop),
                Verdict::Drop(_) | Verdict::NotMine => return,
            };
            let mac = shared.neighbors.lock().ok().and_then(|n| n.get(&next_hop).copied());
            match mac {
                Some(mac) => {
                    buf[0..6].copy_from_slice(&mac);
                    buf[6..12].copy_from_slice(&out.mac);
                    out.send(&buf[..14 + ip_len]);
                }
                // Unknown next hop: ask, and let TCP retransmit.
                None => match next_hop {
                    IpAddr::V4(target) => arp_request(out, target),
                    IpAddr::V6(target) => neighbor_solicit(out, target),
                },
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
fn handle_arp(shared: &Shared, port: &Port, arp: &[u8]) {
    // Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4.
    if arp.len() < 28 || arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return;
    }
    let op = u16::from_be_bytes([arp[6], arp[7]]);
    let sender_mac: [u8; 6] = arp[8..14].try_into().unwrap_or_default();
    let sender_ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let target_ip = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    if let Ok(mut n) = shared.neighbors.lock() {
        n.insert(IpAddr::V4(sender_ip), sender_mac);
    }
    if op == 1 && shared.owned.contains(&IpAddr::V4(target_ip)) {
        let mut reply = Vec::with_capacity(42);
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(&port.mac);
        reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&port.mac);
        reply.extend_from_slice(&target_ip.octets());
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(&sender_ip.octets());
        port.send(&reply);
    }
}

fn arp_request(port: &Port, target: Ipv4Addr) {
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
    port.send(&request);
    let _ = &port.name;
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
fn handle_ndp(shared: &Shared, port: &Port, ip: &[u8], frame_src: [u8; 6]) {
    let src = v6(&ip[8..24]);
    let target = v6(&ip[48..64]);
    if ip[40] == NA {
        if let Ok(mut n) = shared.neighbors.lock() {
            n.insert(IpAddr::V6(target), frame_src);
        }
        return;
    }
    if !src.is_unspecified() {
        if let Ok(mut n) = shared.neighbors.lock() {
            n.insert(IpAddr::V6(src), frame_src);
        }
    }
    if !shared.owned.contains(&IpAddr::V6(target)) || src.is_unspecified() {
        return;
    }
    // Neighbour advertisement: solicited + override, target link-layer option.
    let mut icmp = vec![NA, 0, 0, 0, 0x60, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&port.mac);
    port.send(&ndp_frame(frame_src, port.mac, target, src, icmp));
}

/// Solicits `target` from the port's IPv6 address, at its solicited-node multicast group.
fn neighbor_solicit(port: &Port, target: Ipv6Addr) {
    let Some(src) = port.ip6 else { return };
    let t = target.octets();
    let group =
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let g = group.octets();
    let mac = [0x33, 0x33, g[12], g[13], g[14], g[15]];
    let mut icmp = vec![NS, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&port.mac);
    port.send(&ndp_frame(mac, port.mac, src, group, icmp));
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
