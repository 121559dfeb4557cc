//! The kernel helper's record of an accepted socket, read by the listeners
//! (`Mode::Auto`, `Mode::Ebpf`) straight from its pinned socket storage with
//! two `bpf(2)` calls: no BPF library, so that a `ToaListener` user does not
//! compile one (loading and attaching is the `ebpf` feature's).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use crate::sys;

/// Where the helper's maps and links are pinned.
pub(crate) const PIN_DIR: &str = "/sys/fs/bpf/toa";

/// The helper's per-socket storage, for [`crate::ToaListener`] in auto mode.
pub(crate) struct PeerStore {
    map: std::os::fd::OwnedFd,
}

impl std::fmt::Debug for PeerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerStore")
    }
}

/// What the helper knows about one socket.
pub(crate) enum Stored {
    /// A trusted TOA: the client and the real peer.
    Client { client: SocketAddr, lb: SocketAddr },
    /// The helper saw the connection but found no trusted TOA (yet).
    Nothing { lb: SocketAddr },
}

impl PeerStore {
    /// Opens the pinned storage, when the helper is attached and readable.
    pub(crate) fn open() -> Option<PeerStore> {
        let map = sys::bpf::open_pinned_read_only(&Path::new(PIN_DIR).join("toa_peers")).ok()?;
        Some(PeerStore { map })
    }

    /// The helper's record of the accepted socket `fd` (None: the socket is
    /// not in the helper's cgroup, or the helper came after the connection).
    pub(crate) fn get(&self, fd: &impl AsRawFd, local_v6: bool) -> Option<Stored> {
        let raw = sys::bpf::lookup_peer(self.map.as_fd(), fd.as_raw_fd())?;
        let lb_ip = Ipv6Addr::from(u128::from_be_bytes(words_to_bytes(raw.lb_addr)));
        let lb_port = u16::from_be(raw.lb_port);
        let lb = match (lb_ip.to_ipv4_mapped(), local_v6) {
            (Some(v4), false) => SocketAddr::new(IpAddr::V4(v4), lb_port),
            _ => SocketAddr::V6(SocketAddrV6::new(lb_ip, lb_port, 0, 0)),
        };
        const ST_FOUND: u8 = 2;
        if raw.state != ST_FOUND {
            return Some(Stored::Nothing { lb });
        }
        let port = u16::from_be(raw.port);
        let ip = if raw.family == 2 {
            IpAddr::V4(Ipv4Addr::from(raw.addr[0].to_ne_bytes()))
        } else {
            IpAddr::V6(Ipv6Addr::from(words_to_bytes(raw.addr)))
        };
        let client = crate::peer::as_seen_by(SocketAddr::new(ip, port), local_v6);
        Some(Stored::Client { client, lb })
    }
}

/// Network-order words as stored by the kernel, back to bytes.
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    bytes
}

/// The helper's UDP flows (`toa_udp_flows`, `toa_udp_replies`), for
/// [`crate::uoa::UoaSocket`]: who a datagram's source speaks for, and
/// whether a source the helper already rewrote is a client.
pub(crate) struct UdpFlows {
    flows: std::os::fd::OwnedFd,
    replies: std::os::fd::OwnedFd,
}

impl std::fmt::Debug for UdpFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpFlows")
    }
}

/// 16 bytes of address (IPv4 as ::ffff:a.b.c.d), 2 of port and 2 of local
/// port, network order: `struct udp_key` and `struct udp_rkey`.
fn udp_key(addr: SocketAddr, local_port: u16) -> [u8; 20] {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(&ip.octets());
    key[16..18].copy_from_slice(&addr.port().to_be_bytes());
    key[18..20].copy_from_slice(&local_port.to_be_bytes());
    key
}

impl UdpFlows {
    /// Opens the pinned maps, when the helper is attached with UDP and readable.
    pub(crate) fn open() -> Option<UdpFlows> {
        let dir = Path::new(PIN_DIR);
        let flows = sys::bpf::open_pinned_read_only(&dir.join("toa_udp_flows")).ok()?;
        let replies = sys::bpf::open_pinned_read_only(&dir.join("toa_udp_replies")).ok()?;
        Some(UdpFlows { flows, replies })
    }

    /// The client a datagram from `lb` to `local_port` speaks for (`struct
    /// uoa_client`: address, port, family), as seen by a socket of this family.
    pub(crate) fn client(&self, lb: SocketAddr, local_port: u16, local_v6: bool) -> Option<SocketAddr> {
        let value: [u8; 20] = sys::bpf::lookup_bytes(self.flows.as_fd(), &udp_key(lb, local_port))?;
        let port = u16::from_be_bytes([value[16], value[17]]);
        let ip = match value[18] {
            2 => IpAddr::V4(Ipv4Addr::new(value[0], value[1], value[2], value[3])),
            10 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&value[..16]).ok()?)),
            _ => return None,
        };
        Some(crate::peer::as_seen_by(SocketAddr::new(ip, port), local_v6))
    }

    /// The LB that speaks for `client` at `local_port` (`struct udp_lb`):
    /// set when the helper rewrote a datagram's source to that client.
    pub(crate) fn lb(&self, client: SocketAddr, local_port: u16, local_v6: bool) -> Option<SocketAddr> {
        let value: [u8; 20] = sys::bpf::lookup_bytes(self.replies.as_fd(), &udp_key(client, local_port))?;
        let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&value[..16]).ok()?);
        let port = u16::from_be_bytes([value[16], value[17]]);
        let lb = match (ip.to_ipv4_mapped(), local_v6) {
            (Some(v4), false) => SocketAddr::new(IpAddr::V4(v4), port),
            _ => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
        };
        Some(lb)
    }
}
