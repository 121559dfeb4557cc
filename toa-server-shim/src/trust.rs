//! Which packet sources may speak for a client.
//!
//! A TOA is only as trustworthy as the packet that carried it: anyone can put
//! one in a SYN. A backend honours it only when the packet came from a load
//! balancer's address, listed here as CIDRs.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Huawei Cloud ELB talks to backends from this range.
pub const HUAWEI_ELB: &str = "100.125.0.0/16";

/// The error for a CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid trusted source {input:?}: expected a CIDR such as 100.125.0.0/16 or 2001:db8::/32, or a preset (huawei-elb)"
)]
pub struct InvalidCidr {
    input: String,
}

/// A list of trusted source networks (IPv4 and IPv6).
///
/// ```
/// use toa_server_shim::trust::TrustedSources;
///
/// let trust: TrustedSources = "huawei-elb".parse().unwrap();
/// assert!(trust.contains("100.125.3.4".parse().unwrap()));
/// assert!(!trust.contains("203.0.113.9".parse().unwrap()));
/// // An IPv4 source seen on a dual-stack socket is matched as IPv4.
/// assert!(trust.contains("::ffff:100.125.3.4".parse().unwrap()));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedSources {
    nets: Vec<IpNet>,
}

impl TrustedSources {
    /// An empty list: nothing is trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a network.
    pub fn push(&mut self, net: IpNet) {
        self.nets.push(net.trunc());
    }

    /// Whether no network is listed.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The listed networks.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether `addr` lies in a listed network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.nets.iter().any(|net| net.contains(&addr))
    }
}

impl FromStr for TrustedSources {
    type Err = InvalidCidr;

    /// One network: a CIDR, a bare address (a /32 or /128), or the preset
    /// `huawei-elb`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let text = if s == "huawei-elb" { HUAWEI_ELB } else { s };
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| InvalidCidr { input: s.to_owned() })?;
        let mut list = TrustedSources::new();
        list.push(net);
        Ok(list)
    }
}

impl FromIterator<TrustedSources> for TrustedSources {
    fn from_iter<I: IntoIterator<Item = TrustedSources>>(iter: I) -> Self {
        TrustedSources { nets: iter.into_iter().flat_map(|t| t.nets).collect() }
    }
}

/// Who may speak for a client: the trusted sources, or explicitly anyone.
///
/// There is no default: an empty list is a configuration error
/// ([`NoTrustConfigured`]), because a backend that honours every TOA lets
/// any client choose the address your logs and ACLs see.
///
/// ```
/// use toa_server_shim::trust::{TrustPolicy, TrustedSources};
///
/// assert!(TrustPolicy::new(TrustedSources::new()).is_err());
/// let policy = TrustPolicy::new("huawei-elb".parse().unwrap()).unwrap();
/// assert!(policy.trusts("100.125.9.9".parse().unwrap()));
/// assert!(TrustPolicy::any().trusts("198.51.100.1".parse().unwrap()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustPolicy {
    sources: TrustedSources,
    any: bool,
}

/// No trusted source was configured and trusting anyone was not asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "no trusted load balancer configured: pass --trust CIDR (e.g. --trust huawei-elb for 100.125.0.0/16), \
     or --trust-any to honour a TOA from any source (a client could then forge its address)"
)]
pub struct NoTrustConfigured;

impl TrustPolicy {
    /// Honour a TOA only from `sources`, which must not be empty.
    pub fn new(sources: TrustedSources) -> Result<Self, NoTrustConfigured> {
        if sources.is_empty() {
            return Err(NoTrustConfigured);
        }
        Ok(Self { sources, any: false })
    }

    /// Honour a TOA from any source. Only for networks where no client can
    /// reach the backend except through the load balancer.
    pub fn any() -> Self {
        Self { sources: TrustedSources::new(), any: true }
    }

    /// Whether a TOA in a packet from `source` is honoured.
    pub fn trusts(&self, source: IpAddr) -> bool {
        self.any || self.sources.contains(source)
    }

    /// The trusted sources (empty when trusting anyone).
    pub fn sources(&self) -> &TrustedSources {
        &self.sources
    }

    /// Whether this policy trusts any source.
    pub fn is_any(&self) -> bool {
        self.any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_addresses_and_presets() {
        let list: TrustedSources = ["10.1.2.3", "2001:db8::/32", "huawei-elb"]
            .iter()
            .map(|s| s.parse::<TrustedSources>().unwrap())
            .collect();
        assert_eq!(list.nets().len(), 3);
        assert!(list.contains("10.1.2.3".parse().unwrap()));
        assert!(!list.contains("10.1.2.4".parse().unwrap()));
        assert!(list.contains("2001:db8:1::5".parse().unwrap()));
        assert!(list.contains("100.125.255.255".parse().unwrap()));
        let err = "100.125.0.0/33".parse::<TrustedSources>().unwrap_err();
        assert!(err.to_string().contains("100.125.0.0/33"));
    }

    #[test]
    fn host_bits_are_ignored() {
        let list: TrustedSources = "100.125.7.7/16".parse().unwrap();
        assert!(list.contains("100.125.0.1".parse().unwrap()));
    }
}
