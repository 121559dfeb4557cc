//! `X-Forwarded-For` for L7 listeners (an HTTP load balancer terminates the
//! client's connection and names it in a header), behind the same trust
//! policy as TOA and the PROXY protocol.
//!
//! The header is believed only when the hop that handed the request over is a
//! trusted load balancer: the TCP peer, or the client a trusted TOA or PROXY
//! header named. Then the list is read from the right, past every address
//! that is itself trusted (load balancers that appended their own view), and
//! the first one that is not is the client. Anything a client wrote further
//! left is never looked at, so it cannot choose its address. A header that
//! does not parse is ignored (the peer stands) and counted.
//!
//! ```
//! use toa_server_shim::xff::XffResolver;
//! use toa_server_shim::{PeerInfo, Source, TrustPolicy};
//!
//! let xff = XffResolver::new(TrustPolicy::new("100.125.0.0/16".parse().unwrap()).unwrap());
//! let peer = PeerInfo::direct("100.125.0.1:40000".parse().unwrap());
//! // A client forged 192.0.2.66; the LB appended the address it really saw.
//! let info = xff.resolve(&peer, ["192.0.2.66, 203.0.113.7"]);
//! assert_eq!(info.client, "203.0.113.7:0".parse().unwrap());
//! assert_eq!(info.source, Source::Xff);
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::peer::{PeerInfo, Source};
use crate::trust::TrustPolicy;

/// The header's name.
pub const HEADER: &str = "x-forwarded-for";

/// Reads `X-Forwarded-For` behind trusted load balancers, and counts what it did.
#[derive(Debug)]
pub struct XffResolver {
    policy: TrustPolicy,
    used: AtomicU64,
    untrusted: AtomicU64,
    malformed: AtomicU64,
}

/// What an [`XffResolver`] did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XffStats {
    /// Requests whose client came from the header.
    pub used: u64,
    /// Headers ignored because the hop that sent them is not trusted.
    pub untrusted: u64,
    /// Headers ignored because an entry did not parse.
    pub malformed: u64,
}

/// The longest header read (more is malformed): a chain of a hundred hops.
const MAX_LEN: usize = 8192;

impl XffResolver {
    /// Trusts the load balancers of `policy`.
    pub fn new(policy: TrustPolicy) -> Self {
        XffResolver {
            policy,
            used: AtomicU64::new(0),
            untrusted: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }

    /// The client behind `peer` (what the listener said about the
    /// connection) given the request's `X-Forwarded-For` values, in the
    /// order they came (several header lines count as one list). Without a
    /// usable header, `peer` as it is.
    pub fn resolve<'a>(&self, peer: &PeerInfo, values: impl IntoIterator<Item = &'a str>) -> PeerInfo {
        let mut entries = Vec::new();
        let mut len = 0;
        for value in values {
            len += value.len();
            if len > MAX_LEN {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                return peer.clone();
            }
            entries.extend(value.split(',').map(str::trim));
        }
        if entries.is_empty() {
            return peer.clone();
        }
        if !self.policy.trusts(peer.client.ip()) {
            self.untrusted.fetch_add(1, Ordering::Relaxed);
            return peer.clone();
        }
        let mut parsed = Vec::with_capacity(entries.len());
        for entry in entries {
            match parse_entry(entry) {
                Some(addr) => parsed.push(addr),
                None => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                    return peer.clone();
                }
            }
        }
        // Right to left, past the trusted hops; all trusted: the leftmost.
        let client = parsed.iter().rev().find(|a| !self.policy.trusts(a.ip())).unwrap_or(&parsed[0]);
        self.used.fetch_add(1, Ordering::Relaxed);
        // As the socket would show it on a dual-stack listener.
        let client = crate::peer::as_seen_by(*client, peer.lb.is_ipv6());
        PeerInfo { client, source: Source::Xff, ..peer.clone() }
    }

    /// The counters so far.
    pub fn stats(&self) -> XffStats {
        XffStats {
            used: self.used.load(Ordering::Relaxed),
            untrusted: self.untrusted.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }
}

/// One entry: `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (port 0 when absent).
fn parse_entry(entry: &str) -> Option<SocketAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr);
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<std::net::Ipv6Addr>().ok().map(|ip| SocketAddr::new(IpAddr::V6(ip), 0))
}

/// The axum extractor: the client after TOA or PROXY (the listener's
/// [`PeerInfo`], from `ConnectInfo`) and then `X-Forwarded-For`. Needs the
/// listener's connect info and an `Extension(Arc<XffResolver>)` layer.
///
/// ```no_run
/// use std::sync::Arc;
/// use axum::{Extension, Router, routing::get};
/// use toa_server_shim::xff::{Client, XffResolver};
/// use toa_server_shim::{Config, PeerInfo, TrustPolicy};
///
/// async fn handler(Client(peer): Client) -> String { format!("{peer}\n") }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = TrustPolicy::new("huawei-elb".parse()?)?;
/// let app = Router::new()
///     .route("/", get(handler))
///     .layer(Extension(Arc::new(XffResolver::new(policy.clone()))));
/// let listener = toa_server_shim::tokio::ToaListener::bind("0.0.0.0:8080", Config::new(policy)).await?;
/// axum::serve(listener, app.into_make_service_with_connect_info::<PeerInfo>()).await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "axum")]
#[derive(Clone, Debug)]
pub struct Client(pub PeerInfo);

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Client {
    type Rejection = (axum::http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let missing = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<PeerInfo>>()
            .map(|c| c.0.clone())
            .ok_or((missing, "xff::Client needs into_make_service_with_connect_info::<PeerInfo>()"))?;
        let resolver = parts
            .extensions
            .get::<std::sync::Arc<XffResolver>>()
            .ok_or((missing, "xff::Client needs an Extension(Arc<XffResolver>) layer"))?;
        let values = parts.headers.get_all(HEADER).iter().map(|v| v.to_str().unwrap_or("\u{0}"));
        Ok(Client(resolver.resolve(&peer, values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> XffResolver {
        let sources =
            ["100.125.0.0/16", "10.0.0.0/8", "2001:db8:64::/48"].iter().map(|s| s.parse().unwrap()).collect();
        XffResolver::new(TrustPolicy::new(sources).unwrap())
    }

    fn lb() -> PeerInfo {
        PeerInfo::direct("100.125.0.1:40000".parse().unwrap())
    }

    #[test]
    fn takes_the_rightmost_untrusted_address() {
        let x = resolver();
        let client = |values: &[&str]| x.resolve(&lb(), values.iter().copied()).client.to_string();
        assert_eq!(client(&["203.0.113.7"]), "203.0.113.7:0");
        assert_eq!(client(&["203.0.113.7:40000"]), "203.0.113.7:40000");
        // Forged entries on the left are never reached; trusted hops on the right are skipped.
        assert_eq!(client(&["192.0.2.66, 203.0.113.7, 10.1.2.3"]), "203.0.113.7:0");
        // Several header lines are one list.
        assert_eq!(client(&["192.0.2.66", "203.0.113.7", "10.1.2.3"]), "203.0.113.7:0");
        assert_eq!(client(&["2001:db8:c::7"]), "[2001:db8:c::7]:0");
        assert_eq!(client(&["[2001:db8:c::7]:443"]), "[2001:db8:c::7]:443");
        assert_eq!(client(&["[2001:db8:c::7]"]), "[2001:db8:c::7]:0");
        // All trusted: the leftmost.
        assert_eq!(client(&["10.0.0.1, 100.125.3.3"]), "10.0.0.1:0");
        assert_eq!(x.stats(), XffStats { used: 8, untrusted: 0, malformed: 0 });
    }

    #[test]
    fn ignores_headers_from_untrusted_hops_and_garbage() {
        let x = resolver();
        let stranger = PeerInfo::direct("198.51.100.9:5000".parse().unwrap());
        assert_eq!(x.resolve(&stranger, ["203.0.113.7"]), stranger);
        for garbage in ["203.0.113.7, not-an-ip", "", " , ", "203.0.113.7:99999", "[::1", "unknown", "\u{0}"]
        {
            let info = x.resolve(&lb(), [garbage]);
            assert_eq!(info, lb(), "{garbage:?}");
        }
        let long = "203.0.113.7,".repeat(1000);
        assert_eq!(x.resolve(&lb(), [long.as_str()]), lb());
        assert_eq!(x.stats(), XffStats { used: 0, untrusted: 1, malformed: 8 });
        // No header at all is neither.
        assert_eq!(x.resolve(&lb(), []), lb());
    }

    #[test]
    fn a_trusted_toa_or_proxy_client_hands_over_too() {
        let x = resolver();
        // The LB in front spoke TOA for an L7 proxy at 10.9.9.9 (trusted), which added the header.
        let peer = PeerInfo { client: "10.9.9.9:1234".parse().unwrap(), source: Source::SavedSyn, ..lb() };
        let info = x.resolve(&peer, ["203.0.113.7"]);
        assert_eq!(
            (info.client.to_string(), info.source, info.lb),
            ("203.0.113.7:0".into(), Source::Xff, peer.lb)
        );
        // A dual-stack listener shows a v4 client mapped.
        let v6 = PeerInfo::direct("[::ffff:100.125.0.1]:40000".parse().unwrap());
        assert_eq!(x.resolve(&v6, ["203.0.113.7"]).client.to_string(), "[::ffff:203.0.113.7]:0");
    }
}
