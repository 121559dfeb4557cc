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
