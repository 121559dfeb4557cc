//! Datagrams per second through a plain UDP echo server, for
//! `scripts/bench-uoa.sh` (what the kernel helper's UDP programs cost an
//! unmodified server).
//!
//! - `udp-bench --serve ADDR --seconds S`: an echo server with no toa code
//!   in it (`recv_from`, then `send_to` the address it got), one thread, as
//!   most UDP servers are; prints the datagrams it echoed per second.
//! - `udp-bench --load ADDR --seconds S [--flows F] [--window W] [--uoa]`:
//!   F sockets (flows), each a thread keeping W datagrams in flight. With
//!   `--uoa`, the first datagram of each flow carries an `ipo` UOA naming a
//!   client in 203.0.113.0/24, as a load balancer writes it (needs
//!   CAP_NET_RAW), so the helper records the flow, shows the client to the
//!   server and sends its replies back here. Prints the replies per second
//!   and fails if any reply came from elsewhere than ADDR.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(about = "UDP echo rate, for scripts/bench-uoa.sh")]
struct Args {
    /// Serve echoes on this address.
    #[arg(long, conflicts_with = "load", required_unless_present = "load")]
    serve: Option<SocketAddr>,
    /// Send to the echo server at this address.
    #[arg(long)]
    load: Option<SocketAddr>,
    /// How long.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Flows (sockets, one thread each) of the load.
    #[arg(long, default_value_t = 4)]
    flows: u16,
    /// Datagrams in flight per flow.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Put a UOA (ipo) naming a client into each flow's first datagram.
    #[arg(long)]
    uoa: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.serve, args.load) {
        (Some(addr), _) => serve(addr, args.seconds),
        (None, Some(addr)) => load(addr, &args),
        (None, None) => unreachable!("clap requires one"),
    };
    match result {
        Ok(rate) => {
            println!("{rate:.0}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("udp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Echoes until `seconds` after the first datagram; returns datagrams/s.
fn serve(addr: SocketAddr, seconds: f64) -> std::io::Result<f64> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 65536];
    let mut start = None;
    let mut echoed = 0u64;
    let limit = Duration::from_secs_f64(seconds);
    let idle_deadline = Instant::now() + Duration::from_secs_f64(seconds) + Duration::from_secs(10);
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let began = *start.get_or_insert_with(Instant::now);
                if began.elapsed() >= limit {
                    return Ok(echoed as f64 / began.elapsed().as_secs_f64());
                }
                if socket.send_to(&buf[..n], peer).is_ok() {
                    echoed += 1;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                match start {
                    Some(began) if began.elapsed() >= limit => {
                        return Ok(echoed as f64 / began.elapsed().as_secs_f64());
                    }
                    None if Instant::now() > idle_deadline => {
                        return Err(std::io::Error::other("no load came"));
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// An ipo UOA option naming client `n` (203.0.113.n, port 40000 + n).
fn ipo(n: u16) -> Vec<u8> {
    let port = 40000 + n;
    let mut option = vec![0x1f, 8];
    option.extend_from_slice(&port.to_be_bytes());
    option.extend_from_slice(&[203, 0, 113, (n % 250 + 1) as u8]);
    option
}

/// Runs the flows for `seconds`; returns replies/s.
fn load(to: SocketAddr, args: &Args) -> std::io::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let strays = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for flow in 0..args.flows {
        let socket = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let payload = vec![b'u'; args.size];
        if args.uoa {
            toa_testkit::sys::set_ip_options(socket.as_fd(), &ipo(flow))?;
            socket.send_to(&payload, to)?;
            toa_testkit::sys::set_ip_options(socket.as_fd(), &[])?;
        }
        let (stop, replies, strays, window) = (stop.clone(), replies.clone(), strays.clone(), args.window);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            for _ in 0..window {
                let _ = socket.send_to(&payload, to);
            }
            while !stop.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buf) {
                    Ok((_, from)) if from == to => {
                        replies.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&payload, to);
                    }
                    Ok(_) => {
                        strays.fetch_add(1, Ordering::Relaxed);
                    }
                    // A lost datagram: put one back in flight.
                    Err(_) => {
                        let _ = socket.send_to(&payload, to);
                    }
                }
            }
        }));
    }
    // Counted from the second second: the server starts its clock at our first datagram.
    std::thread::sleep(Duration::from_secs(1));
    let (began, before) = (Instant::now(), replies.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64((args.seconds - 1.0).max(0.5)));
    let rate = (replies.load(Ordering::Relaxed) - before) as f64 / began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    match strays.load(Ordering::Relaxed) {
        0 => Ok(rate),
        n => Err(std::io::Error::other(format!("{n} replies came from elsewhere than {to}"))),
    }
}
