//! Bulk TCP throughput for the LB benchmark:
//! `bulk-bench --serve ADDR` discards what it receives;
//! `bulk-bench --send ADDR [--seconds S]` sends as fast as it can for S seconds
//! and prints the rate in MB/s.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: bulk-bench --serve ADDR | --send ADDR [--seconds S]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(3.0);
    match (args.first().map(String::as_str), args.get(1)) {
        (Some("--serve"), Some(addr)) => {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = vec![0u8; 256 << 10];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        }
        (Some("--send"), Some(addr)) => {
            let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            let block = vec![0x5au8; 256 << 10];
            let (start, mut sent) = (Instant::now(), 0u64);
            while start.elapsed() < Duration::from_secs_f64(seconds) {
                stream.write_all(&block).expect("send");
                sent += block.len() as u64;
            }
            let rate = sent as f64 / start.elapsed().as_secs_f64() / 1e6;
            println!("{rate:.0}");
        }
        _ => usage(),
    }
}
