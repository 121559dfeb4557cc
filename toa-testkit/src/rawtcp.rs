//! A TCP client on an AF_PACKET socket, for putting TOA options where a test
//! wants them, as a load balancer would.
//!
//! It does just enough TCP for a request/response test: SYN (retransmitted),
//! the handshake ACK, one data segment, collecting the server's bytes up to
//! its FIN (or its RST, when it closed without reading the request), then a
//! RST so that neither side keeps state.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use toa_core::{Formats, TcpFlags, TcpPacket, Toa};

/// One connection to make.
#[derive(Clone, Debug)]
pub struct Conn {
    /// The source address (the LB's, or a client's).
    pub src: SocketAddr,
    /// The server.
    pub dst: SocketAddr,
    /// Raw option bytes to put first in the SYN (a TOA, or something malformed).
    pub syn_options: Vec<u8>,
    /// Raw option bytes for the handshake-completing ACK.
    pub ack_options: Vec<u8>,
    /// Bytes to send once the connection is up.
    pub request: Vec<u8>,
    /// Raw option bytes for the segment that carries `request` (DPVS puts a TOA there).
    pub data_options: Vec<u8>,
    /// How long after the handshake to send `request`.
    pub request_delay: Duration,
    /// How the handshake-completing ACK goes on the wire.
    pub ack_wire: Wire,
}

/// How a segment goes on the wire: as one packet, or in a shape that hides
/// its TCP header from a reader that looks only right after a plain IP
/// header (as a forger would send it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    /// One IP packet.
    #[default]
    Plain,
    /// Two IP fragments, the first with the TCP header's first 24 bytes (its
    /// 20 fixed bytes and the first 4 of the options), the second with the
    /// rest. IPv6: behind a fragment header.
    Fragments,
    /// IPv6 only: behind this many 8-byte destination-options extension
    /// headers, chained.
    DestinationOptions(u8),
}

impl Conn {
    /// A connection without options or request.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Conn {
        Conn {
            src,
            dst,
            syn_options: vec![],
            ack_options: vec![],
            request: vec![],
            data_options: vec![],
            request_delay: Duration::ZERO,
            ack_wire: Wire::Plain,
        }
    }

    /// Sends the handshake-completing ACK as `wire` says.
    #[must_use]
    pub fn ack_as(mut self, wire: Wire) -> Conn {
        self.ack_wire = wire;
        self
    }

    /// Puts `toa` in the SYN.
    #[must_use]
    pub fn toa_in_syn(mut self, toa: &Toa) -> Conn {
        self.syn_options.extend(option_bytes(toa));
        self
    }

    /// Puts `toa` in the handshake ACK.
    #[must_use]
    pub fn toa_in_ack(mut self, toa: &Toa) -> Conn {
        self.ack_options.extend(option_bytes(toa));
        self
    }

    /// Sends `request` after the handshake, with `toa` in its segment only.
    #[must_use]
    pub fn toa_in_data(mut self, toa: &Toa, request: &[u8]) -> Conn {
        self.data_options.extend(option_bytes(toa));
        self.request = request.to_vec();
        self
    }
}

/// `toa` as option bytes with the default kinds, NOP-padded to a multiple of 4.
pub fn option_bytes(toa: &Toa) -> Vec<u8> {
    let mut out = [0u8; 20];
    let len = toa.emit(Formats::ALL.kind(toa.format()), &mut out).expect("20 bytes hold any toa");
    let mut bytes = out[..len].to_vec();
    while bytes.len() % 4 != 0 {
        bytes.push(1);
    }
    bytes
}

/// The raw client: one AF_PACKET socket on the LB end of the testbed.
pub struct Client {
    tx: Box<dyn pnet_datalink::DataLinkSender>,
    rx: Box<dyn pnet_datalink::DataLinkReceiver>,
    mac: [u8; 6],
    peer_mac: [u8; 6],
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("mac", &self.mac).finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum State {
    Waiting,
    SynSent { at: Instant, tries: u32 },
    Established { server_next: u32, data: Vec<u8>, fin_at: Option<usize>, request_at: Option<Instant> },
    Done(Result<Vec<u8>, String>),
}

const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xb4];
const ISN: u32 = 0x1000_0000;

impl Client {
    /// Opens the socket on `iface` (call inside the namespace; see `Netns::run`).
    pub fn open(iface: &str, mac: [u8; 6], peer_mac: [u8; 6]) -> Client {
        let interface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == iface)
            .unwrap_or_else(|| panic!("no interface {iface}"));
        let config = pnet_datalink::Config {
            read_timeout: Some(Duration::from_millis(20)),
            promiscuous: false,
            ..Default::default()
        };
        match pnet_datalink::channel(&interface, config) {
            Ok(pnet_datalink::Channel::Ethernet(tx, rx)) => Client { tx, rx, mac, peer_mac },
            Ok(_) => panic!("unexpected channel type"),
            Err(e) => panic!("AF_PACKET on {iface}: {e}"),
        }
    }

    /// Runs `conns` with at most `window` handshakes in flight; returns each
    /// one's response bytes (everything the server sent before its FIN), or
    /// what went wrong.
    pub fn run(&mut self, conns: &[Conn], window: usize, timeout: Duration) -> Vec<Result<Vec<u8>, String>> {
        let mut states: Vec<State> = conns.iter().map(|_| State::Waiting).collect();
        let index: HashMap<(SocketAddr, SocketAddr), usize> =
            conns.iter().enumerate().map(|(i, c)| ((c.src, c.dst), i)).collect();
        assert_eq!(index.len(), conns.len(), "every connection needs its own source address and port");
        let deadline = Instant::now() + timeout;
        let mut next = 0;
        let mut active = 0;
        while Instant::now() < deadline {
            while active < window && next < conns.len() {
                let syn = Segment {
                    flags: TcpFlags::SYN,
                    seq: ISN,
                    ack: 0,
                    options: &conns[next].syn_options,
                    payload: &[],
                };
                self.send(&conns[next], syn);
                states[next] = State::SynSent { at: Instant::now(), tries: 1 };
                next += 1;
                active += 1;
            }
            if active == 0 && next == conns.len() {
                break;
            }
            // Retransmit lost SYNs (a full accept queue drops them).
            for (i, state) in states.iter_mut().enumerate() {
                if let State::SynSent { at, tries } = state {
                    if at.elapsed() > Duration::from_millis(500 * u64::from(*tries)) {
                        let conn = &conns[i];
                        let syn = Segment {
                            flags: TcpFlags::SYN,
                            seq: ISN,
                            ack: 0,
                            options: &conn.syn_options,
                            payload: &[],
                        };
                        send_as(&mut self.tx, self.mac, self.peer_mac, conn, syn, Wire::Plain);
                        *at = Instant::now();
                        *tries += 1;
                    }
                }
            }
            // Requests whose time has come.
            for (i, state) in states.iter_mut().enumerate() {
                if let State::Established { server_next, request_at, .. } = state {
                    if request_at.is_some_and(|at| Instant::now() >= at) {
                        let conn = &conns[i];
                        let flags = TcpFlags::ACK.union(TcpFlags::PSH);
                        let (options, payload) = (&conn.data_options[..], &conn.request[..]);
                        let data = Segment { flags, seq: ISN + 1, ack: *server_next, options, payload };
                        send_as(&mut self.tx, self.mac, self.peer_mac, conn, data, Wire::Plain);
                        *request_at = None;
                    }
                }
            }
            let frame = match self.rx.next() {
                Ok(frame) => frame.to_vec(),
                Err(_) => continue, // read timeout
            };
            if frame.len() < 14 || frame[6..12] == self.mac {
                continue; // our own frames, seen on the way out
            }
            let Ok(packet) = TcpPacket::new_checked(&frame[14..]) else { continue };
            let Some(&i) = index.get(&(packet.dst(), packet.src())) else { continue };
            let tcp = packet.tcp();
            let (flags, seq, payload) = (tcp.flags(), tcp.seq_number(), tcp.payload().to_vec());
            let conn = &conns[i];
            match &mut states[i] {
                State::SynSent { .. } if flags.contains(TcpFlags::SYN.union(TcpFlags::ACK)) => {
                    let server_next = seq.wrapping_add(1);
                    let ack = Segment {
                        flags: TcpFlags::ACK,
                        seq: ISN + 1,
                        ack: server_next,
                        options: &conn.ack_options,
                        payload: &[],
                    };
                    send_as(&mut self.tx, self.mac, self.peer_mac, conn, ack, conn.ack_wire);
                    let request_at = (!conn.request.is_empty()).then(|| Instant::now() + conn.request_delay);
                    states[i] =
                        State::Established { server_next, data: Vec::new(), fin_at: None, request_at };
                }
                State::SynSent { .. } if flags.contains(TcpFlags::RST) => {
                    states[i] = State::Done(Err("connection refused (RST to SYN)".into()));
                    active -= 1;
                }
                State::Established { server_next, data, fin_at, request_at } => {
                    if flags.contains(TcpFlags::SYN.union(TcpFlags::ACK)) {
                        // The server retransmits its SYN-ACK: our ACK was lost (a full
                        // accept queue drops it). Send it again, and the request if it went.
                        let ack = Segment {
                            flags: TcpFlags::ACK,
                            seq: ISN + 1,
                            ack: *server_next,
                            options: &conn.ack_options,
                            payload: &[],
                        };
                        send_as(&mut self.tx, self.mac, self.peer_mac, conn, ack, conn.ack_wire);
                        if request_at.is_none() && !conn.request.is_empty() {
                            let flags = TcpFlags::ACK.union(TcpFlags::PSH);
                            let (options, payload) = (&conn.data_options[..], &conn.request[..]);
                            let data = Segment { flags, seq: ISN + 1, ack: *server_next, options, payload };
                            send_as(&mut self.tx, self.mac, self.peer_mac, conn, data, Wire::Plain);
                        }
                        continue;
                    }
                    if flags.contains(TcpFlags::RST) {
                        // A server that closes without reading our request resets the
                        // connection: what it sent before is its answer.
                        let result = if data.is_empty() {
                            Err("reset by the server before it sent anything".to_owned())
                        } else {
                            Ok(std::mem::take(data))
                        };
                        states[i] = State::Done(result);
                        active -= 1;
                        continue;
                    }
                    let offset = seq.wrapping_sub(*server_next) as usize;
                    if offset <= data.len() && offset + payload.len() > data.len() {
                        data.extend_from_slice(&payload[data.len() - offset..]);
                    }
                    if flags.contains(TcpFlags::FIN) {
                        *fin_at = Some(offset + payload.len());
                    }
                    if fin_at.is_some_and(|end| end == data.len()) {
                        let sent = ISN + 1 + conn.request.len() as u32;
                        let ack = server_next.wrapping_add(data.len() as u32 + 1);
                        let flags = TcpFlags::RST.union(TcpFlags::ACK);
                        self.send(conn, Segment { flags, seq: sent, ack, options: &[], payload: &[] });
                        let data = std::mem::take(data);
                        states[i] = State::Done(Ok(data));
                        active -= 1;
                    }
                }
                _ => {}
            }
        }
        states
            .into_iter()
            .map(|state| match state {
                State::Done(result) => result,
                State::Waiting => Err("never started (timeout)".into()),
                State::SynSent { tries, .. } => Err(format!("no SYN-ACK after {tries} SYNs")),
                State::Established { data, .. } => {
                    Err(format!("no FIN from the server (got {:?})", String::from_utf8_lossy(&data)))
                }
            })
            .collect()
    }

    /// Sends one segment of `conn` and nothing else (for floods: no state, no waiting).
    pub fn send_segment(&mut self, conn: &Conn, segment: Segment<'_>) {
        self.send(conn, segment);
    }

    fn send(&mut self, conn: &Conn, segment: Segment<'_>) {
        send_as(&mut self.tx, self.mac, self.peer_mac, conn, segment, Wire::Plain);
    }
}

/// One segment to send.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// The flags.
    pub flags: TcpFlags,
    /// The sequence number.
    pub seq: u32,
    /// The acknowledgement number (used with ACK).
    pub ack: u32,
    /// Raw option bytes, first in the header.
    pub options: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

/// Sends one segment in the frames `wire` makes of it; the sender is
/// borrowed alone so that callers may hold other state.
fn send_as(
    tx: &mut Box<dyn pnet_datalink::DataLinkSender>,
    mac: [u8; 6],
    peer_mac: [u8; 6],
    conn: &Conn,
    segment: Segment<'_>,
    wire: Wire,
) {
    for frame in frames(mac, peer_mac, conn, segment, wire) {
        match tx.send_to(&frame, None) {
            Some(Ok(())) => {}
            other => panic!("send on the LB end failed: {other:?}"),
        }
    }
}

/// The frames of one segment sent as `wire` says (see [`Wire`]).
///
/// # Panics
/// On [`Wire::DestinationOptions`] for IPv4, and on [`Wire::Fragments`] for
/// a segment of 24 bytes or less (nothing to put in a second fragment).
pub fn frames(
    mac: [u8; 6],
    peer_mac: [u8; 6],
    conn: &Conn,
    segment: Segment<'_>,
    wire: Wire,
) -> Vec<Vec<u8>> {
    const ETH: usize = 14;
    const FIRST: usize = 24;
    let plain = frame(mac, peer_mac, conn, segment);
    let v4 = conn.dst.is_ipv4();
    let ip_len = if v4 { usize::from(plain[ETH] & 0x0f) * 4 } else { 40 };
    let (head, ip, tcp) = (&plain[..ETH], &plain[ETH..ETH + ip_len], &plain[ETH + ip_len..]);
    match wire {
        Wire::Plain => vec![plain],
        Wire::DestinationOptions(n) => {
            assert!(!v4, "destination options are IPv6's");
            // Each: the next header (another, then TCP), length 0 (8 bytes), a PadN of 6 bytes.
            let options: Vec<u8> = (0..n)
                .flat_map(|i| {
                    let next = if i + 1 == n { 6 } else { 60 };
                    [next, 0, 1, 4, 0, 0, 0, 0]
                })
                .collect();
            vec![ipv6_with(head, ip, if n == 0 { 6 } else { 60 }, &options, tcp)]
        }
        Wire::Fragments => {
            assert!(tcp.len() > FIRST, "a segment of {} bytes needs no second fragment", tcp.len());
            let parts = [(0, &tcp[..FIRST], true), (FIRST, &tcp[FIRST..], false)];
            parts
                .into_iter()
                .map(|(offset, part, more)| {
                    if v4 {
                        let mut header = ip.to_vec();
                        let total = (ip_len + part.len()) as u16;
                        header[2..4].copy_from_slice(&total.to_be_bytes());
                        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
                        header[6..8].copy_from_slice(&flags.to_be_bytes());
                        header[10..12].fill(0);
                        let sum = !ipv4_sum(&header);
                        header[10..12].copy_from_slice(&sum.to_be_bytes());
                        [head, &header, part].concat()
                    } else {
                        let field = (offset as u16) | u16::from(more);
                        let [hi, lo] = field.to_be_bytes();
                        let fragment = [6, 0, hi, lo, 0x70, 0x61, 0x00, 0x01]; // id 0x70610001
                        ipv6_with(head, ip, 44, &fragment, part)
                    }
                })
                .collect()
        }
    }
}

/// An IPv6 frame: `ip`'s fixed header with `next` as its next header and
/// the payload length fixed, then `extension`, then `payload`.
fn ipv6_with(head: &[u8], ip: &[u8], next: u8, extension: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut header = ip.to_vec();
    header[6] = next;
    header[4..6].copy_from_slice(&((extension.len() + payload.len()) as u16).to_be_bytes());
    [head, &header, extension, payload].concat()
}

/// The ones'-complement sum of an IPv4 header, folded.
fn ipv4_sum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Builds one Ethernet frame. The TCP options are the segment's options first
/// (where an LB puts a TOA), then MSS on a SYN, NOP-padded.
pub fn frame(mac: [u8; 6], peer_mac: [u8; 6], conn: &Conn, segment: Segment<'_>) -> Vec<u8> {
    let Segment { flags, seq, ack, options, payload } = segment;
    let builder = PacketBuilder::ethernet2(mac, peer_mac);
    let builder = match (conn.src.ip(), conn.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{} and {} are of different families", conn.src, conn.dst),
    };
    let mut tcp = builder.tcp(conn.src.port(), conn.dst.port(), seq, 64240);
    let mut all = options.to_vec();
    if flags.contains(TcpFlags::SYN) {
        all.extend_from_slice(&MSS_OPTION);
    }
    while all.len() % 4 != 0 {
        all.push(1);
    }
    if flags.contains(TcpFlags::SYN) {
        tcp = tcp.syn();
    }
    if flags.contains(TcpFlags::ACK) {
        tcp = tcp.ack(ack);
    }
    if flags.contains(TcpFlags::PSH) {
        tcp = tcp.psh();
    }
    if flags.contains(TcpFlags::RST) {
        tcp = tcp.rst();
    }
    let tcp = tcp.options_raw(&all).expect("options fit in 40 bytes");
    let mut out = Vec::with_capacity(14 + 60 + 60 + payload.len());
    tcp.write(&mut out, payload).expect("writing to a Vec");
    out
}
