//! The pnet driver (AF_PACKET, one frame per system call): the first
//! user-space datapath, kept as a fallback. One thread per interface, both on
//! engine 0.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

use crate::control::Stop;
use crate::datapath::frames::{DatapathError, Link, Neighbors, Owned, PortInfo, Transmit, handle_frame};
use crate::datapath::shards::Shards;

/// A pnet channel: its two halves.
type PnetChannel = (Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>);

/// The pnet driver's sender for both ports.
struct PnetTx<'a>(&'a [Mutex<Box<dyn DataLinkSender>>; 2]);

impl Transmit for PnetTx<'_> {
    fn transmit(&mut self, side: usize, frame: &[u8]) {
        if let Ok(mut tx) = self.0[side].lock() {
            let _ = tx.send_to(frame, None);
        }
    }
}

fn open(interface: &NetworkInterface) -> Result<PnetChannel, DatapathError> {
    // Not promiscuous: the frames toa-lb needs are addressed to this MAC (its ARP
    // answers make sure of that) or broadcast.
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(200)),
        promiscuous: false,
        ..Default::default()
    };
    match pnet_datalink::channel(interface, config) {
        Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx)),
        Ok(_) => Err(DatapathError::Open(interface.name.clone(), std::io::Error::other("not Ethernet"))),
        Err(e) => Err(DatapathError::Open(interface.name.clone(), e)),
    }
}

/// Runs the pnet (fallback) datapath until `stop` is set: one frame per
/// system call, the calling thread serving the client interface and a second
/// thread the backend interface, both on engine 0 of `shards`. `ready` is
/// called once both channels are open.
pub fn run(
    shards: Arc<Shards>,
    client: &NetworkInterface,
    backend: &NetworkInterface,
    owned: Owned,
    stop: Stop,
    ready: impl FnOnce(),
) -> Result<(), DatapathError> {
    let link = Link::new([PortInfo::new(client)?, PortInfo::new(backend)?], owned);
    let (client_tx, client_rx) = open(client)?;
    let (backend_tx, backend_rx) = open(backend)?;
    ready();
    let txs = [Mutex::new(client_tx), Mutex::new(backend_tx)];
    std::thread::scope(|scope| {
        scope.spawn(|| serve(&link, &shards, &txs, 1, backend_rx, &stop));
        serve(&link, &shards, &txs, 0, client_rx, &stop);
    });
    Ok(())
}

/// Serves port `side` (0 client, 1 backend).
fn serve(
    link: &Link,
    shards: &Shards,
    txs: &[Mutex<Box<dyn DataLinkSender>>; 2],
    side: usize,
    mut rx: Box<dyn DataLinkReceiver>,
    stop: &Stop,
) {
    let mut buf = vec![0u8; 65_536 + 64];
    let mut neighbors = Neighbors::new(link);
    let mut last_expiry = Instant::now();
    let engine = shards.engine(0);
    while !stop.is_set() {
        if side == 0 && last_expiry.elapsed() > Duration::from_secs(1) {
            if let Ok(mut engine) = engine.lock() {
                engine.poll_expired(link.start.elapsed());
            }
            last_expiry = Instant::now();
        }
        // Frames held for a next hop whose answer this or the other thread has heard.
        neighbors.release(&mut PnetTx(txs));
        let frame = match rx.next() {
            Ok(frame) => frame,
            Err(_) => continue, // read timeout: check `stop`
        };
        if frame.len() < 14 || frame.len() > buf.len() - 64 {
            continue;
        }
        let len = frame.len();
        buf[..len].copy_from_slice(frame);
        let Ok(mut engine) = engine.lock() else { return };
        handle_frame(link, &mut neighbors, &mut engine, side, &mut buf, len, &mut PnetTx(txs));
    }
}
