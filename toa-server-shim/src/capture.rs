//! Where packets come from: pcap/pcapng files and live interfaces.
//!
//! Both hand the caller each frame's IP packet, after removing the link
//! header (Ethernet with VLAN tags, Linux cooked v1/v2, or none).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};

/// A capture problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not a capture this tool reads.
    #[error("{path} is not a pcap or pcapng file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A link type other than Ethernet, Linux cooked v1/v2 or raw IP.
    #[error("link type {0} is not supported (use Ethernet, Linux cooked v1/v2 or raw IP)")]
    LinkType(u32),
    /// No interface of that name.
    #[error("interface {name} not found; run `ip link` (interfaces here: {available})")]
    NoInterface {
        /// The name asked for.
        name: String,
        /// The names that exist.
        available: String,
    },
    /// Live capture without the needed privilege.
    #[error("live capture on {iface} needs root (CAP_NET_RAW): {source}")]
    Permission {
        /// The interface.
        iface: String,
        /// The error from the kernel.
        source: io::Error,
    },
    /// Opening or reading the live channel failed.
    #[error("capture on {iface} failed: {source}")]
    Live {
        /// The interface.
        iface: String,
        /// The error.
        source: io::Error,
    },
}

/// How frames of a capture begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet II, with any 802.1Q/802.1ad tags.
    Ethernet,
    /// Linux cooked capture v1 (`any` interface, 16-byte header).
    LinuxSll,
    /// Linux cooked capture v2 (20-byte header).
    LinuxSll2,
    /// No link header: the frame is the IP packet.
    RawIp,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

impl LinkType {
    /// The link type of a pcap data link, if supported.
    pub fn from_datalink(link: DataLink) -> Result<Self, CaptureError> {
        match link {
            DataLink::ETHERNET => Ok(LinkType::Ethernet),
            DataLink::LINUX_SLL => Ok(LinkType::LinuxSll),
            DataLink::LINUX_SLL2 => Ok(LinkType::LinuxSll2),
            DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Ok(LinkType::RawIp),
            other => Err(CaptureError::LinkType(u32::from(other))),
        }
    }

    /// The IP packet inside `frame`, or `None` for a frame that does not carry IP.
    ///
    /// ```
    /// use toa_server_shim::capture::LinkType;
    /// let mut frame = vec![0u8; 12];
    /// frame.extend_from_slice(&[0x81, 0x00, 0, 5, 0x08, 0x00]); // VLAN 5, then IPv4
    /// frame.extend_from_slice(&[0x45, 0, 0, 20]);
    /// assert_eq!(LinkType::Ethernet.ip_payload(&frame), Some(&[0x45, 0, 0, 20][..]));
    /// ```
    pub fn ip_payload(self, frame: &[u8]) -> Option<&[u8]> {
        let (ethertype, payload) = match self {
            LinkType::RawIp => return Some(frame),
            LinkType::Ethernet => {
                let mut at = 12;
                let mut ethertype = be16(frame, at)?;
                while ETHERTYPE_VLAN.contains(&ethertype) {
                    at += 4;
                    ethertype = be16(frame, at)?;
                }
                (ethertype, frame.get(at + 2..)?)
            }
            LinkType::LinuxSll => (be16(frame, 14)?, frame.get(16..)?),
            LinkType::LinuxSll2 => (be16(frame, 0)?, frame.get(20..)?),
        };
        matches!(ethertype, ETHERTYPE_IPV4 | ETHERTYPE_IPV6).then_some(payload)
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Calls `each` with the IP packet of every frame in the pcap or pcapng file
/// at `path` (frames without IP are skipped). Returns the number of frames.
pub fn read_file(path: &Path, mut each: impl FnMut(&[u8])) -> Result<usize, CaptureError> {
    let io_err = |source| CaptureError::Io { path: path.to_owned(), source };
    let format_err = |reason: pcap_file::PcapError| CaptureError::Format {
        path: path.to_owned(),
        reason: reason.to_string(),
    };
    let mut file = BufReader::new(File::open(path).map_err(io_err)?);
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(io_err)?;
    let file = io::Cursor::new(magic).chain(file);
    let mut frames = 0;
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut reader = PcapNgReader::new(file).map_err(format_err)?;
        let mut links = Vec::new();
        while let Some(block) = reader.next_block() {
            let (interface, data) = match block.map_err(format_err)? {
                Block::InterfaceDescription(idb) => {
                    links.push(LinkType::from_datalink(idb.linktype));
                    continue;
                }
                Block::EnhancedPacket(epb) => (epb.interface_id as usize, epb.data),
                Block::SimplePacket(spb) => (0, spb.data),
                _ => continue,
            };
            frames += 1;
            let link = match links.get(interface) {
                Some(Ok(link)) => *link,
                Some(Err(CaptureError::LinkType(n))) => return Err(CaptureError::LinkType(*n)),
                _ => {
                    let reason = format!("packet on undeclared interface {interface}");
                    return Err(CaptureError::Format { path: path.to_owned(), reason });
                }
            };
            if let Some(ip) = link.ip_payload(&data) {
                each(ip);
            }
        }
    } else {
        let mut reader = PcapReader::new(file).map_err(format_err)?;
        let link = LinkType::from_datalink(reader.header().datalink)?;
        while let Some(packet) = reader.next_packet() {
            let packet = packet.map_err(format_err)?;
            frames += 1;
            if let Some(ip) = link.ip_payload(&packet.data) {
                each(ip);
            }
        }
    }
    Ok(frames)
}

/// Settings of a live capture.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Stop after this many IP packets for which `each` returned true.
    pub count: Option<usize>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Put the interface in promiscuous mode (off by default: a backend only
    /// needs the packets addressed to it).
    pub promiscuous: bool,
}

/// Captures on interface `name` with an AF_PACKET socket (pnet), calling
/// `each` with every IP packet; `each` returns whether the packet counts
/// towards [`LiveOptions::count`]. `ready` is called once the socket is open,
/// before the first packet.
pub fn live(
    name: &str,
    options: &LiveOptions,
    ready: impl FnOnce(),
    mut each: impl FnMut(&[u8]) -> bool,
) -> Result<(), CaptureError> {
    let interfaces = pnet_datalink::interfaces();
    let Some(interface) = interfaces.iter().find(|i| i.name == name) else {
        let available = interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ");
        return Err(CaptureError::NoInterface { name: name.to_owned(), available });
    };
    let link = live_link_type(name);
    let config = pnet_datalink::Config {
        // Wake up regularly so that --timeout is honoured on a quiet interface.
        read_timeout: Some(Duration::from_millis(100)),
        promiscuous: options.promiscuous,
        ..Default::default()
    };
    let iface = name.to_owned();
    let mut rx = match pnet_datalink::channel(interface, config) {
        Ok(pnet_datalink::Channel::Ethernet(_tx, rx)) => rx,
        Ok(_) => {
            let source = io::Error::other("unexpected channel type");
            return Err(CaptureError::Live { iface, source });
        }
        Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
            return Err(CaptureError::Permission { iface, source });
        }
        Err(source) => return Err(CaptureError::Live { iface, source }),
    };
    ready();
    let deadline = options.timeout.map(|t| Instant::now() + t);
    let mut counted = 0;
    loop {
        if options.count.is_some_and(|n| counted >= n) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        match rx.next() {
            Ok(frame) => {
                if let Some(ip) = link.ip_payload(frame) {
                    counted += usize::from(each(ip));
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(CaptureError::Live { iface, source }),
        }
    }
}

/// The framing of a live interface, from its ARPHRD type in sysfs: Ethernet
/// and loopback carry an Ethernet header, TUN-style devices (ARPHRD_NONE) none.
fn live_link_type(name: &str) -> LinkType {
    let path = format!("/sys/class/net/{name}/type");
    match std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
        Some(65534) => LinkType::RawIp,
        _ => LinkType::Ethernet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        let ip = [0x60u8, 0, 0, 0];
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x86, 0xdd]);
        sll.extend_from_slice(&ip);
        assert_eq!(LinkType::LinuxSll.ip_payload(&sll), Some(&ip[..]));
        let mut sll2 = vec![0x86, 0xdd];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(&ip);
        assert_eq!(LinkType::LinuxSll2.ip_payload(&sll2), Some(&ip[..]));
        // ARP is skipped, truncated headers too.
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 0, 1]);
        assert_eq!(LinkType::Ethernet.ip_payload(&arp), None);
        assert_eq!(LinkType::Ethernet.ip_payload(&[0u8; 13]), None);
        assert_eq!(LinkType::LinuxSll2.ip_payload(&[0x08, 0x00]), None);
    }

    #[test]
    fn unsupported_link_type_is_named() {
        let err = LinkType::from_datalink(DataLink::from(105u32)).unwrap_err();
        assert!(err.to_string().contains("link type 105"), "{err}");
    }
}
