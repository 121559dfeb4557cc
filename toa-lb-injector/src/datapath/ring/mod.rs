//! The ring datapath (user space, for hosts without BPF): one worker per
//! CPU, nothing shared on the hot path.
//!
//! Each worker owns a PACKET_MMAP (TPACKET_V2) receive ring on both
//! interfaces, a `sendmmsg` batch per interface, and its own [`Engine`](crate::engine::Engine)
//! (see [`Shards`]). While frames wait in its rings a worker makes no system
//! call to receive them, and it sends what a round produced in one call per
//! interface; it sleeps in `poll` only when both rings are empty.
//!
//! Steering keeps every flow on one worker. The rings of an interface form a
//! fanout group whose classic BPF program returns a mix of a port
//! ([`Shard::steer`]): frames on the client interface go to worker
//! `steer(source port) % N` (the client's port), frames on the backend
//! interface to worker `steer(destination port) % N`. Engine `i` allocates
//! only SNAT ports that steer to `i`, so a backend's reply
//! lands on the worker that made the flow; in transparent mode the reply's
//! destination port is the client's own, so it does too. ARP frames go to
//! worker 0; any worker answers ARP and NDP from the shared owned set.
//!
//! Why TPACKET_V2 and not V3: a V3 ring hands a block to user space only
//! when it fills or its timer (at least 1 ms) retires it, which adds up to a
//! millisecond per hop to every handshake at low rates. V2 slots are handed
//! over one by one, and still read in batches under load.
//!
//! Limits: IPv6 packets with extension headers and IP fragments are steered
//! by the bytes where the ports would be, so they may reach another worker
//! (which drops them); VLAN-tagged frames are ignored; frames longer than a
//! ring slot (GSO super-packets when offloads are on) are counted and
//! dropped, with a warning naming the fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pnet_datalink::NetworkInterface;

use crate::control::Stop;
use crate::datapath::frames::{DatapathError, Link, Neighbors, Owned, PortInfo, Transmit, handle_frame};
use crate::datapath::shards::Shards;
use crate::engine::config::Shard;
use crate::sys::{RxFrame, RxRing, TxBatch, poll_readable};

/// Frames handled per ring before the worker looks at the other ring and sends.
const BUDGET: usize = 64;
/// Receive ring slots per worker and interface.
const RING_FRAMES: usize = 2048;

/// The frame sizes for an interface: (ring slot, largest frame sent).
fn frame_sizes(name: &str) -> (usize, usize) {
    let mtu = crate::sys::mtu(name).unwrap_or_else(|e| {
        tracing::warn!(interface = name, "cannot read the MTU ({e}); assuming 1500");
        1500
    });
    // Ethernet header, a VLAN tag's worth, and the ring's own header before the frame.
    let slot = (mtu + 14 + 4 + 64).next_power_of_two().max(2048);
    // A TOA may add 40 bytes to a header the MSS clamp left room for.
    (slot, mtu + 14 + 64)
}

/// The steering program: [`Shard::steer`] of the 16-bit port at `port_at`
/// (0: source, 2: destination) of an IPv4 or IPv6 TCP/UDP packet; 0 for
/// anything else. The kernel takes it modulo the group's members.
fn steering(port_at: u32) -> [libc::sock_filter; 13] {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX, BPF_MSH,
        BPF_MUL, BPF_RET, BPF_RSH,
    };
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jeq =
        |k: u32, jt: u8, jf: u8| libc::sock_filter { code: (BPF_JMP | BPF_JEQ | BPF_K) as u16, jt, jf, k };
    // Offsets from the network header, whatever link header the frame has.
    let net = libc::SKF_NET_OFF as u32;
    let mix = stmt(BPF_ALU | BPF_MUL | BPF_K, Shard::STEER_MULTIPLIER);
    let high = stmt(BPF_ALU | BPF_RSH | BPF_K, 16);
    [
        stmt(BPF_LD | BPF_H | BPF_ABS, (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32),
        jeq(0x0800, 0, 5),
        // X = IPv4 header length.
        stmt(BPF_LDX | BPF_B | BPF_MSH, net),
        stmt(BPF_LD | BPF_H | BPF_IND, net.wrapping_add(port_at)),
        mix,
        high,
        stmt(BPF_RET | BPF_A, 0),
        jeq(0x86dd, 0, 4),
        stmt(BPF_LD | BPF_H | BPF_ABS, net.wrapping_add(40 + port_at)),
        mix,
        high,
        stmt(BPF_RET | BPF_A, 0),
        stmt(BPF_RET | BPF_K, 0),
    ]
}

/// One worker's two send batches.
struct Tx([TxBatch; 2]);

impl Transmit for Tx {
    fn transmit(&mut self, side: usize, frame: &[u8]) {
        self.0[side].push(frame);
    }
}

/// One worker's sockets: a receive ring and a send batch per interface.
struct Sockets {
    rx: [RxRing; 2],
    tx: Tx,
}

/// Opens the rings of `workers` workers on both ports and forms the two
/// fanout groups (members join in worker order, so member `i` is worker `i`).
/// Only then do the rings take frames: one that came in while the group was
/// forming would be steered by the members present, not by all, and a worker
/// whose engine does not own its flow would take it. (A client's SYN taken
/// so made a flow in the wrong engine: the backend's SYN-ACK came back through
/// it, and the client's handshake ACK went to its rightful worker, which knew
/// nothing of it, for as long as the client tried.)
fn open_all(
    ports: &[PortInfo; 2],
    sizes: [(usize, usize); 2],
    workers: usize,
) -> Result<Vec<Sockets>, DatapathError> {
    let open_err = |side: usize| {
        let name = ports[side].name.clone();
        move |e: std::io::Error| DatapathError::Open(name, e)
    };
    let mut all = Vec::with_capacity(workers);
    let mut groups = [0u16; 2];
    for _ in 0..workers {
        let mut rings = Vec::with_capacity(2);
        let mut batches = Vec::with_capacity(2);
        for side in 0..2 {
            let (slot, largest) = sizes[side];
            let ring = RxRing::open(ports[side].index, slot, RING_FRAMES).map_err(open_err(side))?;
            groups[side] = ring.join_fanout(groups[side]).map_err(open_err(side))?;
            rings.push(ring);
            batches.push(TxBatch::open(ports[side].index, largest, BUDGET).map_err(open_err(side))?);
        }
        let rx: [RxRing; 2] = rings.try_into().unwrap_or_else(|_| unreachable!("two rings"));
        let tx: [TxBatch; 2] = batches.try_into().unwrap_or_else(|_| unreachable!("two batches"));
        all.push(Sockets { rx, tx: Tx(tx) });
    }
    // Clients' source port on the client side, the destination port on the backend side.
    for (side, port_at) in [(0, 0), (1, 2)] {
        all[0].rx[side].set_steering(&steering(port_at)).map_err(open_err(side))?;
    }
    for sockets in &all {
        for side in 0..2 {
            sockets.rx[side].admit().map_err(open_err(side))?;
        }
    }
    Ok(all)
}

/// Runs the ring datapath until `stop` is set: a worker per engine of
/// `shards`, the calling thread waiting for them. An idle worker spins for
/// `spin` before it sleeps. `ready` is called once the rings take frames.
pub fn run(
    shards: Arc<Shards>,
    client: &NetworkInterface,
    backend: &NetworkInterface,
    owned: Owned,
    spin: Duration,
    stop: Stop,
    ready: impl FnOnce(),
) -> Result<(), DatapathError> {
    let link = Link::new([PortInfo::new(client)?, PortInfo::new(backend)?], owned);
    // Read once: each reading is an ioctl, and a failure warns.
    let sizes = [frame_sizes(&link.ports[0].name), frame_sizes(&link.ports[1].name)];
    let sockets = open_all(&link.ports, sizes, shards.len())?;
    let slot = sizes[0].0.max(sizes[1].0);
    tracing::info!(workers = sockets.len(), "ring datapath (TPACKET_V2 rings, fanout by port)");
    ready();
    std::thread::scope(|scope| {
        for (i, sockets) in sockets.into_iter().enumerate() {
            let (link, shards, stop) = (&link, &shards, &stop);
            std::thread::Builder::new()
                .name(format!("toa-lb-worker-{i}"))
                .spawn_scoped(scope, move || worker(link, shards, i, sockets, slot, spin, stop))
                .map(drop)
                .unwrap_or_else(|e| {
                    tracing::error!("cannot start worker {i}: {e}");
                    stop.set();
                });
        }
    });
    Ok(())
}

static TRUNCATED_WARNED: AtomicBool = AtomicBool::new(false);

fn worker(
    link: &Link,
    shards: &Shards,
    index: usize,
    mut sockets: Sockets,
    slot: usize,
    spin: Duration,
    stop: &Stop,
) {
    let (engine, counters) = (shards.engine(index), &shards.datapath);
    let mut neighbors = Neighbors::new(link);
    let mut buf = vec![0u8; slot + 64];
    let mut last_expiry = Instant::now();
    while !stop.is_set() {
        let mut handled = 0;
        {
            let mut engine = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for side in 0..2 {
                for _ in 0..BUDGET {
                    let more = sockets.rx[side].next_frame(|frame| match frame {
                        RxFrame::Frame(frame) if frame.len() >= 14 && frame.len() + 64 <= buf.len() => {
                            let len = frame.len();
                            buf[..len].copy_from_slice(frame);
                            handle_frame(
                                link,
                                &mut neighbors,
                                &mut engine,
                                side,
                                &mut buf,
                                len,
                                &mut sockets.tx,
                            );
                        }
                        RxFrame::Frame(_) => {}
                        RxFrame::Vlan => {
                            counters.vlan.fetch_add(1, Ordering::Relaxed);
                        }
                        RxFrame::Truncated(len) => {
                            counters.truncated.fetch_add(1, Ordering::Relaxed);
                            if !TRUNCATED_WARNED.swap(true, Ordering::Relaxed) {
                                tracing::warn!(
                                    interface = %link.ports[side].name,
                                    len,
                                    "dropping frames longer than the MTU (GSO/GRO super-packets): turn \
                                     offloads off on this interface and its peers (ethtool -K IF gso off \
                                     gro off tso off)"
                                );
                            }
                        }
                    });
                    if !more {
                        break;
                    }
                    handled += 1;
                }
            }
            // Frames held for a next hop whose answer this or another worker has heard.
            neighbors.release(&mut sockets.tx);
            if last_expiry.elapsed() > Duration::from_secs(1) {
                engine.poll_expired(link.start.elapsed());
                last_expiry = Instant::now();
            }
        }
        for batch in &mut sockets.tx.0 {
            let dropped = batch.flush();
            if dropped > 0 {
                counters.tx_dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        if handled == 0 {
            // Idle: poll the rings a little first, since under load the next frame
            // comes within microseconds and a sleep costs two context switches;
            // yielding meanwhile, so that threads sharing the core (other
            // workers, the kernel's softirq threads, other programs) still run.
            // (Measured on 2 cores: 0.64 of the kernel's connection rate with two
            // workers, against 0.52 with a pure spin.)
            let spin_until = Instant::now() + spin;
            while Instant::now() < spin_until && !sockets.rx[0].ready() && !sockets.rx[1].ready() {
                std::thread::yield_now();
            }
            if !sockets.rx[0].ready() && !sockets.rx[1].ready() {
                if let Some(e) = poll_readable(&[sockets.rx[0].fd(), sockets.rx[1].fd()], 100) {
                    // Typically ENETDOWN: the ring resumes when the link is back.
                    tracing::warn!(worker = index, "receive ring: {e}");
                }
            }
        }
    }
}
