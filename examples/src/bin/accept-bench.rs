//! Accepted connections per second on loopback: a plain listener against
//! `ToaListener` (saved SYN; and capture mode, whose packet socket needs
//! CAP_NET_RAW), std and tokio, measured in the same run with the rounds
//! interleaved, so that the machine's noise hits every side alike.
//!
//! `cargo run --release -p toa-examples --bin accept-bench -- [--seconds S] [--rounds N]`

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use toa_server_shim::{Config, Mode, TcpListenerExt, TrustPolicy};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    PlainStd,
    ToaStd,
    PlainTokio,
    ToaTokio,
    CaptureStd,
    CaptureTokio,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::PlainStd => "std TcpListener",
            Variant::ToaStd => "std ToaListener",
            Variant::PlainTokio => "tokio TcpListener",
            Variant::ToaTokio => "tokio ToaListener",
            Variant::CaptureStd => "std capture",
            Variant::CaptureTokio => "tokio capture",
        }
    }

    /// The listener's mode (loopback is trusted, so capture's filter walks
    /// every segment's options to the port; none carries a TOA).
    fn config(self) -> Config {
        let mode = if matches!(self, Variant::CaptureStd | Variant::CaptureTokio) {
            Mode::Capture
        } else {
            Mode::SavedSyn
        };
        Config::new(TrustPolicy::new("127.0.0.0/8".parse().expect("cidr")).expect("non-empty")).mode(mode)
    }
}

/// Runs a server of `variant` for `seconds` against `clients` connecting threads;
/// returns accepted connections per second.
fn measure(variant: Variant, seconds: f64, clients: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let server = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || serve(variant, listener, &stop, &accepted))
    };
    let load: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || connect_loop(addr, None, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200)); // warm up
    let start_count = accepted.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let count = accepted.load(Ordering::Relaxed) - start_count;
    let rate = count as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for client in load {
        let _ = client.join();
    }
    // Wake the server's blocking accept.
    let _ = TcpStream::connect(addr);
    let _ = server.join();
    rate
}

/// Where one load client's connections come from with `--from`: it cycles
/// through every address, and through its own share of the ports, so that a
/// source address and port come back only after `addresses x ports`
/// connections, as with many real clients. (With one address, the kernel's
/// choice, a port comes back every few seconds at ten thousand connections a
/// second, and a connection tracker keeping closed flows for 10 s carries the
/// new connection on the old flow's entry instead of making a new one.)
struct Sources {
    addrs: Vec<IpAddr>,
    first_port: u16,
    ports: u16,
    next: usize,
}

impl Sources {
    /// Client `index` of `clients`: the ports [`FIRST_PORT`]-65535 are split between them.
    /// (At most [`MAX_SOURCED_CLIENTS`] clients: [`check_sources`].)
    fn new(addrs: Vec<IpAddr>, index: usize, clients: usize) -> Sources {
        let clients = clients.clamp(1, MAX_SOURCED_CLIENTS);
        let ports = MAX_SOURCED_CLIENTS / clients;
        let first = FIRST_PORT + (index % clients) * ports;
        // first + ports <= FIRST_PORT + MAX_SOURCED_CLIENTS = 65535: both fit.
        Sources { addrs, first_port: first as u16, ports: ports as u16, next: 0 }
    }

    fn next(&mut self) -> SocketAddr {
        let (n, k) = (self.addrs.len(), self.next);
        self.next = self.next.wrapping_add(1);
        let port = self.first_port + ((k / n) % usize::from(self.ports)) as u16;
        SocketAddr::new(self.addrs[k % n], port)
    }
}

/// The lowest source port `--from` uses.
const FIRST_PORT: usize = 1024;
/// The most load clients `--from` can give ports of their own.
const MAX_SOURCED_CLIENTS: usize = 65535 - FIRST_PORT;

/// Refuses `--from` addresses that cannot work before the load starts (every
/// connection would fail and the load would spin, measuring nothing): another
/// family than `target`'s, an address this host does not have, or more
/// clients than there are ports to share.
fn check_sources(from: &[IpAddr], target: SocketAddr, clients: usize) -> Result<(), String> {
    if from.is_empty() {
        return Ok(());
    }
    if clients > MAX_SOURCED_CLIENTS {
        return Err(format!("at most {MAX_SOURCED_CLIENTS} clients (one port each), not {clients}"));
    }
    // Binding alone would accept any address with net.ipv4.ip_nonlocal_bind
    // (or ipv6's) set: the address must be one of an interface's (or loopback).
    let local: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("listing the interfaces' addresses: {e}"))?
        .filter_map(|a| a.address)
        .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .collect();
    for &ip in from {
        if ip.is_ipv4() != target.is_ipv4() {
            return Err(format!("{ip} is not of {target}'s address family"));
        }
        if !ip.is_loopback() && !local.contains(&ip) {
            return Err(format!("{ip} is not an address of this host's interfaces"));
        }
        // (An IPv6 address still in duplicate address detection cannot be bound yet.)
        TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| format!("{ip}: {e}"))?;
    }
    Ok(())
}

/// A connection to `addr` from `from` (bound first).
fn connect_from(addr: SocketAddr, from: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&from.into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

fn connect_loop(addr: SocketAddr, mut sources: Option<Sources>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // Closed loop: wait for the server's byte, so that at most `clients`
        // connections are in flight and the accept queue never overflows (an
        // open loop floods it whenever the server thread is descheduled, and
        // each dropped SYN stalls a client for a second).
        let connected = match sources.as_mut() {
            Some(sources) => connect_from(addr, sources.next()),
            None => TcpStream::connect(addr),
        };
        if let Ok(mut stream) = connected {
            // Not forever: a server that lost the handshake's ACK (a SYN
            // cookie, then a full accept queue) never sends, and a client
            // with nothing to send never learns it; that stalled a benchmark
            // for minutes. A stall costs this client a second.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = stream.read(&mut [0u8; 1]);
            reset(&stream);
        }
    }
}

/// Both sides close with RST: neither keeps TIME_WAIT state, which would
/// otherwise stall reused ports for a second each and swamp the measurement.
fn reset(stream: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn serve(variant: Variant, listener: TcpListener, stop: &AtomicBool, accepted: &AtomicU64) {
    match variant {
        Variant::PlainStd | Variant::ToaStd | Variant::CaptureStd => {
            let toa = (variant != Variant::PlainStd).then(|| {
                listener.try_clone().expect("clone listener").with_toa(variant.config()).expect("ToaListener")
            });
            while !stop.load(Ordering::Relaxed) {
                // The same loop for both: only the accept call differs.
                let accepted_conn = match &toa {
                    Some(toa) => toa.accept().map(|(stream, peer)| (stream, Some(peer))),
                    None => listener.accept().map(|(stream, _)| (stream, None)),
                };
                if let Ok((mut stream, peer)) = accepted_conn {
                    let _ = stream.write_all(b"!");
                    reset(&stream);
                    std::hint::black_box((stream, peer));
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Variant::PlainTokio | Variant::ToaTokio | Variant::CaptureTokio => {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                use tokio::io::AsyncWriteExt;
                listener.set_nonblocking(true).expect("nonblocking");
                let toa = (variant != Variant::PlainTokio).then(|| {
                    let clone = listener.try_clone().expect("clone listener");
                    let clone = tokio::net::TcpListener::from_std(clone).expect("tokio listener");
                    toa_server_shim::tokio::ToaListener::from_tokio(clone, variant.config())
                        .expect("ToaListener")
                });
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                while !stop.load(Ordering::Relaxed) {
                    // The same loop for both: only the accept call differs.
                    let conn = match &toa {
                        Some(toa) => toa.accept().await.map(|(stream, peer)| (stream, Some(peer))),
                        None => listener.accept().await.map(|(stream, _)| (stream, None)),
                    };
                    if let Ok(mut conn) = conn {
                        let _ = conn.0.write_all(b"!").await;
                        reset(&conn.0);
                        std::hint::black_box(conn);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
}

fn main() {
    let mut seconds = 2.0;
    let mut rounds = 3;
    let mut only = None;
    let mut serve_addr: Option<String> = None;
    let mut load: Option<String> = None;
    let mut clients = 2;
    let mut from: Vec<IpAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    let usage = || -> ! {
        eprintln!(
            "usage: accept-bench [--seconds S] [--rounds N] [--only plain-std|toa-std|plain-tokio|toa-tokio|capture-std|capture-tokio]\n       accept-bench --serve ADDR [--seconds S] | --load ADDR [--clients N] [--seconds S] [--from IP,IP,...]"
        );
        std::process::exit(2);
    };
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--seconds" => seconds = value.parse().unwrap_or_else(|_| usage()),
            "--rounds" => rounds = value.parse().unwrap_or_else(|_| usage()),
            "--only" => {
                only = Some(match value.as_str() {
                    "plain-std" => Variant::PlainStd,
                    "toa-std" => Variant::ToaStd,
                    "plain-tokio" => Variant::PlainTokio,
                    "toa-tokio" => Variant::ToaTokio,
                    "capture-std" => Variant::CaptureStd,
                    "capture-tokio" => Variant::CaptureTokio,
                    _ => usage(),
                })
            }
            "--serve" => serve_addr = Some(value),
            "--load" => load = Some(value),
            "--clients" => clients = value.parse().unwrap_or_else(|_| usage()),
            "--from" => {
                from = value.split(',').map(|a| a.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            _ => usage(),
        }
    }
    if let Some(addr) = load {
        // The load alone, in its own process (and cgroup): stops after `seconds`.
        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
        if let Err(e) = check_sources(&from, addr, clients) {
            eprintln!("accept-bench: --from: {e}");
            std::process::exit(2);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let loops: Vec<_> = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                let sources = (!from.is_empty()).then(|| Sources::new(from.clone(), i, clients));
                std::thread::spawn(move || connect_loop(addr, sources, &stop))
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        for client in loops {
            let _ = client.join();
        }
        return;
    }
    if let Some(addr) = serve_addr {
        // The server alone: measures for `seconds` once the first connection arrives.
        let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let variant = only.unwrap_or(Variant::PlainStd);
        let server = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || serve(variant, listener, &stop, &accepted))
        };
        eprintln!("accept-bench: serving on {addr}");
        while accepted.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200)); // warm up
        let (count0, start) = (accepted.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let rate = (accepted.load(Ordering::Relaxed) - count0) as f64 / start.elapsed().as_secs_f64();
        println!("{rate:.0}");
        stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&addr);
        let _ = server.join();
        return;
    }
    if let Some(variant) = only {
        // One measurement for a driver script (e.g. with and without the kernel helper).
        let rate = measure(variant, seconds, 2);
        println!("{rate:.0}");
        return;
    }
    let clients = 2;
    // Capture mode needs CAP_NET_RAW: measured only when the packet socket opens.
    let capture =
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.with_toa(Variant::CaptureStd.config())).is_ok();
    let variants = [
        Variant::PlainStd,
        Variant::ToaStd,
        Variant::PlainTokio,
        Variant::ToaTokio,
        Variant::CaptureStd,
        Variant::CaptureTokio,
    ];
    let mut totals = [0.0f64; 6];
    for round in 1..=rounds {
        // Rotate the order, so that no side always runs first (warm caches, drift).
        let mut order: Vec<usize> =
            if round % 2 == 1 { vec![0, 1, 4, 2, 3, 5] } else { vec![4, 1, 0, 5, 3, 2] };
        if !capture {
            order.retain(|&i| i < 4);
        }
        for i in order {
            let variant = &variants[i];
            let rate = measure(*variant, seconds, clients);
            eprintln!("round {round}: {:<18} {rate:>9.0} accepts/s", variant.name());
            totals[i] += rate;
        }
    }
    let mean = |i: usize| totals[i] / rounds as f64;
    println!("{:<18} {:>12}", "listener", "accepts/s");
    for (i, variant) in variants.iter().enumerate() {
        println!("{:<18} {:>12.0}", variant.name(), mean(i));
    }
    println!("ratio std   ToaListener / TcpListener: {:.3}", mean(1) / mean(0));
    println!("ratio tokio ToaListener / TcpListener: {:.3}", mean(3) / mean(2));
    if capture {
        println!("ratio std   capture / TcpListener:     {:.3}", mean(4) / mean(0));
        println!("ratio tokio capture / TcpListener:     {:.3}", mean(5) / mean(2));
    } else {
        println!("(capture mode not measured: no CAP_NET_RAW)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_ports_and_all_fit() {
        let addrs: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        for clients in [1, 2, 64, 1000, MAX_SOURCED_CLIENTS, MAX_SOURCED_CLIENTS + 10] {
            let mut last_end = FIRST_PORT as u16;
            let indices: std::collections::BTreeSet<usize> =
                [0, 1, clients / 2, clients.saturating_sub(1)].into_iter().filter(|i| *i < clients).collect();
            for index in indices {
                let s = Sources::new(addrs.clone(), index, clients);
                assert!(s.ports >= 1 && usize::from(s.first_port) >= FIRST_PORT, "{clients} {index}");
                assert!(usize::from(s.first_port) + usize::from(s.ports) <= 65535, "{clients} {index}");
                // (More clients than ports are refused by `check_sources`; here they only must not overflow.)
                if clients <= MAX_SOURCED_CLIENTS {
                    assert!(s.first_port >= last_end, "spans do not overlap: {clients} {index}");
                }
                last_end = s.first_port + s.ports;
            }
        }
        // Addresses cycle first, then ports, within the client's span.
        let mut s = Sources::new(addrs, 1, 2);
        let seen: Vec<SocketAddr> = (0..4).map(|_| s.next()).collect();
        let first = FIRST_PORT + MAX_SOURCED_CLIENTS / 2;
        assert_eq!(seen[0], SocketAddr::new("127.0.0.1".parse().unwrap(), first as u16));
        assert_eq!(seen[1], SocketAddr::new("127.0.0.2".parse().unwrap(), first as u16));
        assert_eq!(seen[2].port(), first as u16 + 1);
    }

    #[test]
    fn sources_that_cannot_work_are_refused() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let lo: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap()];
        assert_eq!(check_sources(&[], v4, 1_000_000), Ok(()));
        assert_eq!(check_sources(&lo, v4, 64), Ok(()));
        assert!(check_sources(&lo, v4, MAX_SOURCED_CLIENTS + 1).unwrap_err().contains("at most"));
        let v6: Vec<IpAddr> = vec!["::1".parse().unwrap()];
        assert!(check_sources(&v6, v4, 2).unwrap_err().contains("address family"));
        // A documentation address this host does not have.
        let absent: Vec<IpAddr> = vec!["192.0.2.77".parse().unwrap()];
        assert!(check_sources(&absent, v4, 2).unwrap_err().contains("not an address of this host"));
    }
}
