//! `whoami`: answers every connection with one line naming its client, then closes.
//!
//! ```text
//! whoami --listen 0.0.0.0:8080 --trust huawei-elb [--source auto|saved-syn|none] [--runtime std|tokio]
//! client=203.0.113.7:40000 lb=100.125.0.1:40000 source=saved-syn
//! ```
//!
//! `--runtime udp` answers every UDP datagram instead, through a
//! `toa_server_shim::uoa::UoaSocket` (UOA: `ipo` on its own, both formats
//! with the kernel helper attached), with the same line and `source=uoa`.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use toa_examples::whoami::Options;
use toa_server_shim::{PeerInfo, ToaListener};

#[derive(Parser)]
#[command(name = "whoami", about = "Answer each connection with `client=... lb=... source=...` and close it")]
struct Cli {
    #[command(flatten)]
    options: Options,
    /// Which listener to use.
    #[arg(long, value_enum, default_value = "std")]
    runtime: Runtime,
}

#[derive(Clone, Copy, ValueEnum)]
enum Runtime {
    /// `toa_server_shim::ToaListener`, one thread per connection.
    Std,
    /// `toa_server_shim::tokio::ToaListener`.
    Tokio,
    /// UDP: `toa_server_shim::uoa::UoaSocket`, a line per datagram.
    Udp,
}

fn line(peer: &PeerInfo) -> String {
    format!("{peer}\n")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.options.config_or_exit("whoami") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let result = match cli.runtime {
        Runtime::Std => serve_std(&cli.options.listen, config),
        Runtime::Tokio => serve_tokio(&cli.options.listen, config),
        Runtime::Udp => match cli.options.policy() {
            Ok(policy) => serve_udp(&cli.options.listen, policy),
            Err(e) => {
                eprintln!("whoami: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whoami: {}: {e}", cli.options.listen);
            ExitCode::FAILURE
        }
    }
}

fn serve_std(listen: &str, config: toa_server_shim::Config) -> std::io::Result<()> {
    let listener = ToaListener::bind(listen, config)?;
    eprintln!("whoami: listening on {} (std)", listener.local_addr()?);
    loop {
        match listener.accept_pending() {
            // The PROXY header (if any) is read on the connection's own thread,
            // so a slow peer holds up no one else.
            Ok(pending) => {
                std::thread::spawn(move || match pending.finish() {
                    // Short writes to a client that went away are its business, not ours.
                    Ok((mut stream, peer)) => {
                        let _ = stream.write_all(line(&peer).as_bytes());
                    }
                    Err(e) => eprintln!("whoami: {e}"),
                });
            }
            Err(e) => eprintln!("whoami: accept: {e}"),
        }
    }
}

fn serve_tokio(listen: &str, config: toa_server_shim::Config) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        use tokio::io::AsyncWriteExt;
        let listener = toa_server_shim::tokio::ToaListener::bind(listen, config).await?;
        eprintln!("whoami: listening on {} (tokio)", listener.local_addr()?);
        loop {
            match listener.accept().await {
                Ok((mut stream, peer)) => {
                    tokio::spawn(async move {
                        let _ = stream.write_all(line(&peer).as_bytes()).await;
                    });
                }
                Err(e) => eprintln!("whoami: accept: {e}"),
            }
        }
    })
}

fn serve_udp(listen: &str, policy: toa_server_shim::TrustPolicy) -> std::io::Result<()> {
    let socket = toa_server_shim::uoa::UoaSocket::bind(listen, policy)?;
    eprintln!("whoami: listening on {} (udp)", socket.local_addr()?);
    let mut buf = [0u8; 65536];
    loop {
        let (_, peer) = socket.recv_from(&mut buf)?;
        let line = format!("client={} lb={} source={}\n", peer.client, peer.lb, peer.source);
        // A reply to the client goes back through the LB that spoke for it.
        if let Err(e) = socket.send_to(line.as_bytes(), peer.client) {
            eprintln!("whoami: reply to {}: {e}", peer.client);
        }
    }
}
