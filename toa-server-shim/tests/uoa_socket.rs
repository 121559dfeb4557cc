//! `UoaSocket` on loopback (root: a sender may set an unknown IPv4 option
//! only with CAP_NET_RAW): an `ipo` UOA names the client only from a trusted
//! source; later datagrams of the flow are remembered; replies to the client
//! go to the load balancer; a malformed option area is ignored and counted.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use toa_server_shim::uoa::UoaSocket;
use toa_server_shim::{Source, TrustPolicy};
use toa_testkit::require_root;

/// Sets the IPv4 options of every datagram `socket` sends.
fn set_ip_options(socket: &UdpSocket, options: &[u8]) {
    toa_testkit::sys::set_ip_options(socket.as_fd(), options).expect("IP_OPTIONS");
}

fn ipo(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let SocketAddr::V4(v4) = client else { panic!("v4") };
    let mut o = vec![0x1f, 8];
    o.extend_from_slice(&v4.port().to_be_bytes());
    o.extend_from_slice(&v4.ip().octets());
    o
}

#[test]
fn uoa_socket_trust_memory_and_replies() {
    require_root!();
    for (trust, expect_uoa) in [("127.0.0.0/8", true), ("100.125.0.0/16", false)] {
        let server =
            UoaSocket::bind("127.0.0.1:0", TrustPolicy::new(trust.parse().unwrap()).unwrap()).unwrap();
        server.get_ref().set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = server.local_addr().unwrap();
        let lb = UdpSocket::bind("127.0.0.1:0").unwrap();
        lb.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let lb_addr = lb.local_addr().unwrap();
        let mut buf = [0u8; 64];

        set_ip_options(&lb, &ipo("203.0.113.7:40000"));
        lb.send_to(b"first", to).unwrap();
        let (n, peer) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        set_ip_options(&lb, &[]);
        lb.send_to(b"second", to).unwrap();
        let (_, later) = server.recv_from(&mut buf).unwrap();
        if expect_uoa {
            let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
            assert_eq!((peer.client, peer.lb, peer.source), (client, lb_addr, Source::Uoa));
            assert_eq!((later.client, later.source), (client, Source::Uoa), "remembered for the flow");
            // A reply to the client goes to the LB.
            server.send_to(b"reply", client).unwrap();
            let (n, from) = lb.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"reply"[..], to));
            let stats = server.stats();
            assert_eq!((stats.uoa, stats.remembered, stats.untrusted), (1, 1, 0));
        } else {
            assert_eq!((peer.client, peer.source), (lb_addr, Source::None), "untrusted: ignored");
            assert_eq!(later.client, lb_addr);
            assert_eq!(server.stats().untrusted, 1);
        }
        // A malformed option area (a UOA option of length 9, padded with EOL): the source stands.
        set_ip_options(&lb, &[0x1f, 9, 0, 1, 203, 0, 113, 7, 0, 0, 0, 0]);
        lb.send_to(b"bad", to).unwrap();
        let (_, bad) = server.recv_from(&mut buf).unwrap();
        if !expect_uoa {
            assert_eq!(bad.client, lb_addr);
        }
        assert_eq!(server.stats().malformed, 1);
    }
}

/// The tokio socket: the same UOA, remembered flow and reply path.
#[test]
fn tokio_uoa_socket() {
    require_root!();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let policy = TrustPolicy::new("127.0.0.0/8".parse().unwrap()).unwrap();
        let server = toa_server_shim::uoa::TokioUoaSocket::bind("127.0.0.1:0", policy).await.unwrap();
        let to = server.local_addr().unwrap();
        let lb = UdpSocket::bind("127.0.0.1:0").unwrap();
        lb.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let client: SocketAddr = "203.0.113.8:40001".parse().unwrap();
        // An empty carrier first (an LB's answer to a datagram with no room
        // for the UOA): recorded, not returned; the datagram after it is named.
        set_ip_options(&lb, &ipo("203.0.113.8:40001"));
        lb.send_to(b"", to).unwrap();
        set_ip_options(&lb, &[]);
        lb.send_to(b"one", to).unwrap();
        lb.send_to(b"two", to).unwrap();
        let mut buf = [0u8; 64];
        for expected in [&b"one"[..], b"two"] {
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            assert_eq!((&buf[..n], peer.client, peer.source), (expected, client, Source::Uoa));
        }
        server.send_to(b"back", client).await.unwrap();
        let (n, from) = lb.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"back"[..], to));
        let stats = server.stats();
        assert_eq!((stats.received, stats.uoa, stats.remembered, stats.carriers), (3, 1, 2, 1));
    });
}
