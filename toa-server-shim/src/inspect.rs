//! Decoding what a load balancer sends: one record per TCP packet.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use toa_core::{Error, Formats, TcpPacket, ToaOption, UdpPacket, uoa};

use crate::trust::TrustedSources;

/// Decodes IP packets into [`Record`]s.
///
/// ```
/// use toa_server_shim::inspect::{Inspector, Record};
///
/// let inspector = Inspector::new(Default::default(), "huawei-elb".parse().unwrap());
/// let syn: &[u8] = &[
///     0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 125, 0, 1, 192, 0, 2, 10,
///     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x70, 0x02, 0xff, 0xff, 0, 0, 0, 0,
///     254, 8, 0x9c, 0x40, 203, 0, 113, 7,
/// ];
/// let record = inspector.inspect(syn).unwrap();
/// assert_eq!(
///     record.to_json(),
///     r#"{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"S","toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"}],"trusted":true}"#
/// );
/// ```
#[derive(Clone, Debug, Default)]
pub struct Inspector {
    formats: Formats,
    trust: TrustedSources,
}

/// What [`Inspector::inspect`] found in one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A well-formed TCP packet.
    Segment(Segment),
    /// A packet that claims to be IP/TCP but is malformed.
    Malformed(Malformed),
    /// A UDP datagram that carries a UOA (`ipo` or `opp`).
    Datagram(Datagram),
}

/// A UDP datagram and the UOA in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Datagram {
    /// Source address and port.
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// The UOA (one per datagram).
    pub uoa: Vec<UoaRecord>,
    /// Whether the packet's IP source is a trusted load balancer.
    pub trusted: bool,
}

/// One UOA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UoaRecord {
    /// `ipo` or `opp`.
    pub format: &'static str,
    /// The client, `IP:PORT`.
    pub addr: String,
}

/// A TCP packet and the TOA options in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Source address and port.
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// The set flags as letters, in the order F, S, R, P, A, U, E, C.
    pub flags: String,
    /// Every TOA of an enabled format, in header order (the first wins).
    pub toa: Vec<ToaRecord>,
    /// Whether the packet's IP source is a trusted load balancer.
    pub trusted: bool,
}

/// One TOA option.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToaRecord {
    /// The format name (`toa`, `toa6`, `ali-v6`, `tencent`, `ali-cdn`).
    pub format: &'static str,
    /// The option kind.
    pub kind: u8,
    /// The option length.
    pub len: u8,
    /// The client: `IP:PORT`, or just the IP for `ali-cdn` (IPv6 in brackets).
    pub addr: String,
}

/// A malformed packet: the error and the byte offset it points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// What is wrong.
    pub error: String,
    /// Where, counted from the start of the IP header.
    pub offset: usize,
}

impl Inspector {
    /// An inspector that accepts `formats` and trusts packets from `trust`.
    pub fn new(formats: Formats, trust: TrustedSources) -> Self {
        Self { formats, trust }
    }

    /// Decodes one packet that starts at its IP header. Returns `None` for a
    /// packet that carries neither TCP nor a UOA (and for fragments of other
    /// protocols).
    pub fn inspect(&self, ip_packet: &[u8]) -> Option<Record> {
        let packet = match TcpPacket::new_checked(ip_packet) {
            Ok(packet) => packet,
            Err(Error::NotTcp { protocol: 17 | uoa::IPPROTO_OPT, .. }) => return self.inspect_udp(ip_packet),
            Err(Error::NotTcp { .. }) => return None,
            Err(Error::Fragment { offset }) if !is_tcp_fragment(ip_packet, offset) => return None,
            Err(err) => return Some(Record::Malformed(Malformed::from(err))),
        };
        let mut toa = Vec::new();
        for found in packet.toas(&self.formats) {
            match found {
                Ok(found) => toa.push(ToaRecord::from(found)),
                Err(err) => return Some(Record::Malformed(Malformed::from(err))),
            }
        }
        Some(Record::Segment(Segment {
            src: packet.src().to_string(),
            dst: packet.dst().to_string(),
            flags: packet.tcp().flags().to_string(),
            toa,
            trusted: self.trust.contains(packet.src_addr()),
        }))
    }
}

impl Inspector {
    /// A UDP datagram (or an `opp` one): a record when it carries a UOA.
    fn inspect_udp(&self, ip_packet: &[u8]) -> Option<Record> {
        let found = match uoa::find_uoa(ip_packet) {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(err) => return Some(Record::Malformed(Malformed::from(err))),
        };
        // The ports are in the UDP header, after an opp header if there is one.
        let mut plain = ip_packet.to_vec();
        let len = plain.len();
        let udp = uoa::strip_uoa(&mut plain, len)
            .and_then(|(n, _)| UdpPacket::new_checked(&plain[..n]).map(|u| (u.src(), u.dst())));
        let (src, dst) = match udp {
            Ok(ends) => ends,
            Err(err) => return Some(Record::Malformed(Malformed::from(err))),
        };
        Some(Record::Datagram(Datagram {
            src: src.to_string(),
            dst: dst.to_string(),
            uoa: vec![UoaRecord { format: found.format.name(), addr: found.client.to_string() }],
            trusted: self.trust.contains(src.ip()),
        }))
    }
}

/// Whether a fragment reported at `offset` carries TCP.
fn is_tcp_fragment(packet: &[u8], offset: usize) -> bool {
    match packet.first().map(|b| b >> 4) {
        // IPv4: the protocol field.
        Some(4) => packet.get(9) == Some(&6),
        // IPv6: the fragment header's next-header field.
        _ => packet.get(offset) == Some(&6),
    }
}

impl From<Error> for Malformed {
    fn from(err: Error) -> Self {
        Malformed { error: err.to_string(), offset: err.offset().unwrap_or(0) }
    }
}

impl From<ToaOption> for ToaRecord {
    fn from(found: ToaOption) -> Self {
        let addr = match found.toa.socket_addr() {
            Some(addr) => addr.to_string(),
            None => match found.toa.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            },
        };
        ToaRecord { format: found.toa.format().name(), kind: found.kind, len: found.len, addr }
    }
}

impl Record {
    /// The record as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> String {
        let json = match self {
            Record::Segment(segment) => serde_json::to_string(segment),
            Record::Malformed(malformed) => serde_json::to_string(malformed),
            Record::Datagram(datagram) => serde_json::to_string(datagram),
        };
        // Strings and integers only: serialisation cannot fail.
        json.unwrap_or_else(|err| format!(r#"{{"error":"internal: {err}","offset":0}}"#))
    }
}

impl fmt::Display for Record {
    /// A line for a person: `SRC > DST [FLAGS] toa ADDR (FORMAT kind/len), trusted LB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Malformed(m) => write!(f, "malformed packet (offset {}): {}", m.offset, m.error),
            Record::Datagram(d) => {
                write!(f, "{} > {} udp", d.src, d.dst)?;
                for u in &d.uoa {
                    write!(f, " uoa {} ({})", u.addr, u.format)?;
                }
                Ok(())
            }
            Record::Segment(s) => {
                write!(f, "{} > {} [{}]", s.src, s.dst, s.flags)?;
                match s.toa.split_first() {
                    None => f.write_str(" no toa")?,
                    Some((first, rest)) => {
                        write!(f, " toa {} ({} {}/{})", first.addr, first.format, first.kind, first.len)?;
                        for other in rest {
                            write!(
                                f,
                                ", also {} ({} {}/{})",
                                other.addr, other.format, other.kind, other.len
                            )?;
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// Parses a hex dump of one packet: hex digits with optional `0x` prefixes,
/// white space, `:` or `-` between bytes.
///
/// ```
/// use toa_server_shim::inspect::parse_hex;
/// assert_eq!(parse_hex("45 00:0x1c-ff").unwrap(), [0x45, 0x00, 0x1c, 0xff]);
/// assert!(parse_hex("4").is_err());
/// ```
pub fn parse_hex(text: &str) -> Result<Vec<u8>, HexError> {
    let cleaned: String = text
        .split(|c: char| c.is_whitespace() || c == ':' || c == '-' || c == ',')
        .map(|word| word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")).unwrap_or(word))
        .collect();
    if let Some((at, c)) = cleaned.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(HexError::NotHex { at, c });
    }
    if cleaned.len() % 2 != 0 {
        return Err(HexError::OddDigits { digits: cleaned.len() });
    }
    Ok((0..cleaned.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&cleaned[i..i + 2], 16).ok())
        .collect())
}

/// A hex dump that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexError {
    /// A character that is not a hex digit.
    #[error("not a hex digit: {c:?} (digit {at})")]
    NotHex {
        /// Position among the digits.
        at: usize,
        /// The character.
        c: char,
    },
    /// An odd number of digits.
    #[error("odd number of hex digits ({digits}): a byte needs two")]
    OddDigits {
        /// How many digits.
        digits: usize,
    },
}

/// Counts of what an inspection saw, for a closing summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// TCP packets decoded.
    pub segments: usize,
    /// Of those, packets with at least one TOA.
    pub with_toa: usize,
    /// Of those, packets with a TOA from an untrusted source.
    pub untrusted_toa: usize,
    /// Malformed packets.
    pub malformed: usize,
    /// UDP datagrams with a UOA.
    pub with_uoa: usize,
    /// Of those, from untrusted sources.
    pub untrusted_uoa: usize,
}

impl Summary {
    /// Counts one record.
    pub fn count(&mut self, record: &Record) {
        match record {
            Record::Malformed(_) => self.malformed += 1,
            Record::Datagram(d) => {
                self.with_uoa += 1;
                self.untrusted_uoa += usize::from(!d.trusted);
            }
            Record::Segment(s) => {
                self.segments += 1;
                if !s.toa.is_empty() {
                    self.with_toa += 1;
                    self.untrusted_toa += usize::from(!s.trusted);
                }
            }
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tcp packets, {} with toa ({} from untrusted sources), {} malformed",
            self.segments, self.with_toa, self.untrusted_toa, self.malformed
        )?;
        if self.with_uoa > 0 {
            write!(
                f,
                "; {} udp datagrams with uoa ({} from untrusted sources)",
                self.with_uoa, self.untrusted_uoa
            )?;
        }
        Ok(())
    }
}
