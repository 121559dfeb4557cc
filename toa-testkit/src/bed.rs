//! The backend testbed: one namespace, a veth pair `toa-lb` / `toa-srv`.
//!
//! `toa-srv` is the backend (192.0.2.10/24, 2001:db8:be::a/64). What it sends
//! to the test ranges (100.125.0.0/16, 198.51.100.0/24, 203.0.113.0/24,
//! 2001:db8::/32) leaves through a gateway (192.0.2.1, 2001:db8:be::1) that is
//! a static neighbour entry pointing at `toa-lb`'s MAC. `toa-lb` has no address: its kernel drops what arrives (no RST
//! to suppress) while the test's AF_PACKET socket sees every frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::Netns;
use crate::rawtcp::Client;

/// The LB end's interface and MAC.
pub const LB_IFACE: &str = "toa-lb";
/// The LB end's MAC.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The backend end's interface.
pub const SERVER_IFACE: &str = "toa-srv";
/// The backend end's MAC.
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The backend's IPv4 address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The backend's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0, 0, 0, 0, 0xa);
/// An LB (SNAT) address in Huawei's range.
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(100, 125, 0, 1);
/// An IPv6 LB address.
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 1);
/// A host outside every trusted range.
pub const STRANGER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

/// The testbed; its namespace is deleted on drop.
#[derive(Debug)]
pub struct Bed {
    /// The namespace holding both ends.
    pub ns: Netns,
}

impl Bed {
    /// Builds the testbed in a fresh namespace.
    pub fn new(tag: &str) -> Bed {
        let ns = Netns::new(tag);
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let (lb_mac, srv_mac) = (mac(LB_MAC), mac(SERVER_MAC));
        let sh = |cmd: &str| {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            ns.exec(&args);
        };
        sh(&format!(
            "ip link add {LB_IFACE} address {lb_mac} type veth peer name {SERVER_IFACE} address {srv_mac}"
        ));
        sh(&format!("sysctl -qw net.ipv6.conf.{LB_IFACE}.disable_ipv6=1"));
        // Small segments only, but keep the frames the LB end sees exactly as sent.
        for iface in [LB_IFACE, SERVER_IFACE] {
            sh(&format!("ip link set {iface} up"));
        }
        sh(&format!("ip addr add {SERVER_V4}/24 dev {SERVER_IFACE}"));
        sh(&format!("ip -6 addr add {SERVER_V6}/64 dev {SERVER_IFACE} nodad"));
        sh(&format!("ip neigh replace 192.0.2.1 lladdr {lb_mac} dev {SERVER_IFACE} nud permanent"));
        sh(&format!("ip -6 neigh replace 2001:db8:be::1 lladdr {lb_mac} dev {SERVER_IFACE} nud permanent"));
        // Routes to the test's own ranges only, no default route: anything else
        // (a resolver lookup, say) fails at once instead of waiting for a timeout.
        for net in ["100.125.0.0/16", "198.51.100.0/24", "203.0.113.0/24"] {
            sh(&format!("ip route add {net} via 192.0.2.1 dev {SERVER_IFACE}"));
        }
        sh(&format!("ip -6 route add 2001:db8::/32 via 2001:db8:be::1 dev {SERVER_IFACE}"));
        // Room for many handshakes at once, and no SYN cookies: a cookie SYN is not saved.
        sh("sysctl -qw net.core.somaxconn=8192");
        sh("sysctl -qw net.ipv4.tcp_max_syn_backlog=8192");
        sh("sysctl -qw net.ipv4.tcp_syncookies=0");
        Bed { ns }
    }

    /// A raw client on the LB end.
    pub fn client(&self) -> Client {
        self.ns.run(|| Client::open(LB_IFACE, LB_MAC, SERVER_MAC))
    }

    /// Binds a std listener inside the namespace.
    pub fn listen(&self, addr: SocketAddr) -> std::net::TcpListener {
        self.ns.run(|| std::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    }
}

/// `ip:port` as a `SocketAddr`.
pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
