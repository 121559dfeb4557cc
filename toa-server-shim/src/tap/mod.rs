//! Capture mode: the TOA of the handshake's ACK (or the first data
//! segments), without the kernel helper and without root.
//!
//! Most load balancers put the TOA only in the ACK that completes the
//! handshake (Huawei ELB, LVS, DPVS, Alibaba), which `TCP_SAVED_SYN` cannot
//! see. A packet socket can: the kernel hands every frame to packet taps
//! before TCP processes it, so the ACK that completed a connection is queued
//! here before `accept()` returns it. A classic BPF filter (`tap::filter`,
//! generated per listener) keeps only segments to the listener's port from
//! trusted sources that carry a TOA-format option; at `accept()` the listener drains what is queued and
//! looks the connection up by its 4-tuple.
//!
//! Needs CAP_NET_RAW only (no root, no BPF program), any kernel, in any
//! network namespace (the socket sees that namespace's interfaces). Memory
//! is bounded: at most [`MAX_ENTRIES`] connections are remembered, each for
//! [`TTL`].

pub(crate) mod filter;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use toa_core::{Formats, TcpPacket, Toa};

use crate::peer::fit_ip_length;
use crate::sys;
use crate::trust::TrustPolicy;

/// Connections remembered at most (about 100 bytes each).
pub const MAX_ENTRIES: usize = 65536;
/// How long a captured TOA waits for its connection's `accept()`.
pub const TTL: Duration = Duration::from_secs(30);

/// The packet socket and what it caught.
#[derive(Debug)]
pub(crate) struct Tap {
    fd: OwnedFd,
    policy: TrustPolicy,
    formats: Formats,
    /// (source, destination), canonical addresses -> the first trusted TOA seen.
    seen: HashMap<(SocketAddr, SocketAddr), (Toa, Instant)>,
    /// Entries that did not fit: the table was full of live ones.
    overflow: u64,
    /// Packets the kernel dropped because this socket's queue was full,
    /// as of the last [`Tap::dropped`].
    drops: u64,
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Tap {
    /// Opens the packet socket for a listener on `port`, with its filter.
    pub(crate) fn open(port: u16, policy: &TrustPolicy, formats: &Formats) -> io::Result<Tap> {
        let program = filter::program(port, policy, formats);
        let fd = sys::tap::open(&program)?;
        Ok(Tap { fd, policy: policy.clone(), formats: *formats, seen: HashMap::new(), overflow: 0, drops: 0 })
    }

    /// Reads what is queued (without blocking) into the table.
    fn drain(&mut self) {
        let mut buf = [0u8; filter::SNAP as usize];
        // Bounded, so that a flood cannot hold one accept() forever.
        for _ in 0..4096 {
            let Ok(Some(n)) = sys::tap::recv(self.fd.as_fd(), &mut buf) else { break };
            let packet = &mut buf[..n];
            // The filter keeps at most SNAP bytes: the IP length field may claim more.
            fit_ip_length(packet);
            let Ok(packet) = TcpPacket::new_checked(&*packet) else { continue };
            if !self.policy.trusts(packet.src_addr()) {
                continue;
            }
            let Ok(Some(found)) = packet.toa(&self.formats) else { continue };
            let key = (canonical(packet.src()), canonical(packet.dst()));
            if !self.seen.contains_key(&key) && !self.make_room() {
                self.overflow += 1;
                continue;
            }
            self.seen.entry(key).or_insert((found.toa, Instant::now()));
        }
    }

    /// Whether there is room for one more entry, after expiring old ones.
    fn make_room(&mut self) -> bool {
        if self.seen.len() < MAX_ENTRIES {
            return true;
        }
        let now = Instant::now();
        self.seen.retain(|_, (_, at)| now.duration_since(*at) < TTL);
        self.seen.len() < MAX_ENTRIES
    }

    /// The TOA captured for the connection from `peer` to `local`, if any
    /// (and forgets it).
    pub(crate) fn take(&mut self, peer: SocketAddr, local: SocketAddr) -> Option<Toa> {
        self.drain();
        let (toa, at) = self.seen.remove(&(canonical(peer), canonical(local)))?;
        (at.elapsed() < TTL).then_some(toa)
    }

    /// Segments lost: the kernel's queue drops (read, and reset, here rather
    /// than at every accept) and what did not fit the table.
    pub(crate) fn dropped(&mut self) -> u64 {
        self.drops += sys::tap::drops(self.fd.as_fd()).unwrap_or(0);
        self.drops + self.overflow
    }

    /// Connections remembered now.
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}
