//! The PROXY protocol (v1 text, v2 binary), as load balancers that terminate
//! TCP pass the client in front of the stream (Huawei ELB on request,
//! Alibaba CLB/NLB, AWS NLB). Parsing is the `ppp` crate's; this module
//! decides, from the bytes a connection has sent so far, whether a header is
//! there and how long it is, so that exactly the header is consumed and
//! everything after it stays in the socket for the application.
//!
//! It is honoured only from trusted peers: a header from anyone else is
//! refused (the connection is closed and counted), never handed on as data.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::PartialResult;

/// Whether a listener expects a PROXY protocol header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// No header is read: the stream is the application's from its first byte.
    #[default]
    Off,
    /// A trusted peer may send one; connections without one are served as
    /// they are. The listener must see the first bytes to decide, so this
    /// suits protocols where the client speaks first (HTTP, TLS); with a
    /// server-speaks-first protocol a direct client waits for the timeout.
    Optional,
    /// Every connection must start with one, from a trusted peer: others are
    /// closed and counted.
    Required,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(ProxyProtocol::Off),
            "optional" => Ok(ProxyProtocol::Optional),
            "required" => Ok(ProxyProtocol::Required),
            other => {
                Err(format!("unknown PROXY protocol setting {other:?}: expected off, optional or required"))
            }
        }
    }
}

/// The largest header accepted: a v1 line is at most 107 bytes; a v2 header
/// 16 bytes plus addresses (at most 216) plus TLVs. 2048 leaves room for the
/// TLVs load balancers send (AWS's VPC endpoint id, SSL details) and bounds
/// what one connection can make the listener buffer.
pub const MAX_HEADER: usize = 2048;

/// How long a connection may take to send its header, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_PREFIX: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Not a PROXY header (they differ from both signatures).
    Absent,
    /// A header of this many bytes is complete in what was seen.
    Header(usize),
    /// Too few bytes to tell, or the header is not complete yet.
    NeedMore,
    /// A header that cannot be valid: wrong version or command, bad
    /// addresses, or longer than [`MAX_HEADER`].
    Invalid(&'static str),
}

/// Looks at the bytes a connection has sent so far (`seen`, at most
/// [`MAX_HEADER`] of them).
pub(crate) fn decide(seen: &[u8]) -> Decision {
    let v1 = prefix_state(seen, V1_PREFIX);
    let v2 = prefix_state(seen, V2_PREFIX);
    match (v1, v2) {
        (Signature::No, Signature::No) => Decision::Absent,
        (Signature::Yes, _) => match seen.iter().position(|&b| b == b'\n') {
            Some(end) if end < 107 => Decision::Header(end + 1),
            Some(_) => Decision::Invalid("a v1 header longer than 107 bytes"),
            None if seen.len() >= 107 => Decision::Invalid("a v1 header longer than 107 bytes"),
            None => Decision::NeedMore,
        },
        (_, Signature::Yes) => {
            if seen.len() < 16 {
                return Decision::NeedMore;
            }
            let len = 16 + usize::from(u16::from_be_bytes([seen[14], seen[15]]));
            if len > MAX_HEADER {
                return Decision::Invalid("a v2 header longer than the limit");
            }
            if seen.len() < len { Decision::NeedMore } else { Decision::Header(len) }
        }
        _ => Decision::NeedMore,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signature {
    /// `seen` starts with the whole signature.
    Yes,
    /// `seen` is a proper prefix of it.
    Maybe,
    /// It differs.
    No,
}

fn prefix_state(seen: &[u8], signature: &[u8]) -> Signature {
    let n = seen.len().min(signature.len());
    if seen[..n] != signature[..n] {
        Signature::No
    } else if n == signature.len() {
        Signature::Yes
    } else {
        Signature::Maybe
    }
}

/// What the first bytes of a stream hold (see [`parse_prefix`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// They are not a PROXY header.
    Absent,
    /// They start one; more bytes are needed.
    Incomplete,
    /// A complete header, and how many bytes it takes (what follows is the
    /// application's).
    Header(ProxyHeader, usize),
    /// A header that can never be valid (malformed, oversized).
    Invalid(&'static str),
}

/// Reads a PROXY header (v1 or v2) at the start of `seen`, for callers that
/// do their own I/O: the listeners drive the same function. At most
/// [`MAX_HEADER`] bytes are ever needed.
///
/// ```
/// use toa_server_shim::proxy::{parse_prefix, Prefix};
///
/// let seen = b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 80\r\nGET / HTTP/1.1\r\n";
/// let Prefix::Header(header, len) = parse_prefix(seen) else { panic!() };
/// assert_eq!(header.addresses.unwrap().0, "203.0.113.7:40000".parse().unwrap());
/// assert_eq!(&seen[len..], b"GET / HTTP/1.1\r\n");
/// assert_eq!(parse_prefix(b"PROXY TCP4 203.0"), Prefix::Incomplete);
/// assert_eq!(parse_prefix(b"GET / HTTP/1.1"), Prefix::Absent);
/// ```
pub fn parse_prefix(seen: &[u8]) -> Prefix {
    let seen = &seen[..seen.len().min(MAX_HEADER)];
    match decide(seen) {
        Decision::Absent => Prefix::Absent,
        Decision::NeedMore => Prefix::Incomplete,
        Decision::Invalid(why) => Prefix::Invalid(why),
        Decision::Header(len) => match parse(&seen[..len]) {
            Ok(header) => Prefix::Header(header, len),
            Err(why) => Prefix::Invalid(why),
        },
    }
}

/// What to do with a connection, given what it has sent so far.
#[derive(Debug)]
pub(crate) enum Step {
    /// No header: hand the stream over as it is.
    Absent,
    /// Read exactly this many bytes, the header, then [`parse`] them.
    Consume(usize),
    /// Wait for more bytes (until the timeout).
    Wait,
    /// Close it.
    Refuse(ProxyError),
}

/// The decision for one connection from `peer` (`trusted`: by the trust
/// policy), with `seen` the bytes it has sent so far, `closed` when it has
/// closed without sending anything. The std and tokio listeners drive it.
pub(crate) fn step(
    setting: ProxyProtocol,
    trusted: bool,
    peer: SocketAddr,
    seen: &[u8],
    closed: bool,
) -> Step {
    if setting == ProxyProtocol::Off {
        return Step::Absent;
    }
    if setting == ProxyProtocol::Required && !trusted {
        return Step::Refuse(ProxyError::Untrusted(peer));
    }
    let absent = || {
        if setting == ProxyProtocol::Required {
            Step::Refuse(ProxyError::Missing(peer))
        } else {
            Step::Absent
        }
    };
    if closed {
        return absent();
    }
    match decide(seen) {
        Decision::Absent => absent(),
        Decision::Header(_) | Decision::Invalid(_) if !trusted => Step::Refuse(ProxyError::Untrusted(peer)),
        Decision::Header(len) => Step::Consume(len),
        Decision::Invalid(why) => Step::Refuse(ProxyError::Malformed(peer, why)),
        Decision::NeedMore => Step::Wait,
    }
}

/// A PROXY protocol header, as the application sees it on [`crate::PeerInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// The client and the address it connected to; `None` for the LOCAL
    /// command (a health check by the LB itself), `UNKNOWN` (v1), or an
    /// address family other than TCP over IPv4/IPv6.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 type-length-values, in header order: `(type, value)` (e.g. 0x01
    /// ALPN, 0x02 authority, 0x05 unique id, 0xEA AWS VPC endpoint).
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyHeader {
    /// The TLV of `kind`, if the header has one.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
    }
}

/// Parses a complete header (`decide` said [`Decision::Header`]).
pub(crate) fn parse(header: &[u8]) -> Result<ProxyHeader, &'static str> {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(h)) => {
            let addresses = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(ProxyHeader { version: 1, addresses, tlvs: Vec::new() })
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            let mut tlvs = Vec::new();
            for tlv in h.tlvs() {
                let tlv = tlv.map_err(|_| "malformed v2 TLVs")?;
                tlvs.push((tlv.kind, tlv.value.to_vec()));
            }
            let addresses = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (ppp::v2::Command::Proxy, _) => None,
            };
            Ok(ProxyHeader { version: 2, addresses, tlvs })
        }
        result if result.is_incomplete() => Err("an incomplete header"),
        _ => Err("a malformed header"),
    }
}

/// Why a connection was refused while its header was read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A header (or, with `Required`, any connection) from a peer outside the trust policy.
    #[error("PROXY protocol from {0}, which is not a trusted load balancer: connection closed")]
    Untrusted(SocketAddr),
    /// `Required`, and the connection did not start with a header.
    #[error("no PROXY protocol header from {0}: connection closed")]
    Missing(SocketAddr),
    /// A malformed or oversized header.
    #[error("bad PROXY protocol header from {0}: {1}")]
    Malformed(SocketAddr, &'static str),
    /// The header did not arrive within the timeout.
    #[error("PROXY protocol header from {0} not complete within {1:?}: connection closed")]
    Timeout(SocketAddr, Duration),
    /// The peer closed, or the socket failed, before the header was read.
    #[error("reading the PROXY protocol header from {0}: {1}")]
    Io(SocketAddr, std::io::Error),
}

impl From<ProxyError> for std::io::Error {
    fn from(e: ProxyError) -> Self {
        let kind = match &e {
            ProxyError::Untrusted(_) => std::io::ErrorKind::PermissionDenied,
            ProxyError::Missing(_) | ProxyError::Malformed(..) => std::io::ErrorKind::InvalidData,
            ProxyError::Timeout(..) => std::io::ErrorKind::TimedOut,
            ProxyError::Io(_, e) => e.kind(),
        };
        std::io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn decides_from_prefixes() {
        assert_eq!(decide(b""), Decision::NeedMore);
        assert_eq!(decide(b"PRO"), Decision::NeedMore);
        assert_eq!(decide(b"\r\n\r"), Decision::NeedMore);
        assert_eq!(decide(b"GET / HTTP/1.1\r\n"), Decision::Absent);
        assert_eq!(decide(b"\x16\x03\x01"), Decision::Absent);
        assert_eq!(decide(b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 80\r"), Decision::NeedMore);
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 80\r\nGET /";
        assert_eq!(decide(line), Decision::Header(line.len() - 5));
        assert_eq!(
            decide(&[b"PROXY ".as_slice(), &[b'x'; 120]].concat()),
            Decision::Invalid("a v1 header longer than 107 bytes")
        );
        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 10, 0x9c, 0x40, 0, 80];
        let h = v2(1, 0x11, &body);
        assert_eq!(decide(&h[..15]), Decision::NeedMore);
        assert_eq!(decide(&h[..20]), Decision::NeedMore);
        assert_eq!(decide(&[h.as_slice(), b"data"].concat()), Decision::Header(28));
        body.resize(MAX_HEADER, 0);
        assert_eq!(decide(&v2(1, 0x11, &body)[..16]), Decision::Invalid("a v2 header longer than the limit"));
    }

    #[test]
    fn parses_v1_v2_local_and_tlvs() {
        let h = parse(b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 80\r\n").unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(
            h.addresses,
            Some(("203.0.113.7:40000".parse().unwrap(), "192.0.2.10:80".parse().unwrap()))
        );
        let h = parse(b"PROXY TCP6 2001:db8::7 2001:db8::a 40000 443\r\n").unwrap();
        assert_eq!(h.addresses.unwrap().0, "[2001:db8::7]:40000".parse().unwrap());
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().addresses, None);

        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 10, 0x9c, 0x40, 0, 80];
        body.extend_from_slice(&[0x02, 0, 11]);
        body.extend_from_slice(b"example.com");
        body.extend_from_slice(&[0xea, 0, 3, 1, 2, 3]);
        let h = parse(&v2(1, 0x11, &body)).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.addresses.unwrap().0, "203.0.113.7:40000".parse().unwrap());
        assert_eq!(h.tlv(0x02), Some(b"example.com".as_slice()));
        assert_eq!(h.tlvs, vec![(0x02, b"example.com".to_vec()), (0xea, vec![1, 2, 3])]);
        // LOCAL: a health check of the LB itself.
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().addresses, None);
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        assert!(parse(b"PROXY TCP4 203.0.113.7\r\n").is_err());
        assert!(parse(b"PROXY TCP4 999.0.113.7 192.0.2.10 40000 80\r\n").is_err());
        // Version 1 in a binary header, an unknown command, a length too short for its addresses.
        let mut bad = v2(1, 0x11, &[0; 12]);
        bad[12] = 0x11;
        assert!(parse(&bad).is_err());
        assert!(parse(&v2(5, 0x11, &[0; 12])).is_err());
        assert!(parse(&v2(1, 0x11, &[0; 4])).is_err());
        // A TLV claiming more than there is.
        let mut body = vec![0; 12];
        body.extend_from_slice(&[0x02, 0, 50, b'x']);
        assert!(parse(&v2(1, 0x11, &body)).is_err());
    }
}
