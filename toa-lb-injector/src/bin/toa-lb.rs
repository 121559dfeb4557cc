//! `toa-lb`: a FULLNAT L4 load balancer that writes the client's address
//! into a TOA option ("Obtain Client IP Address").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use toa_lb_injector::file::LbConfig;
use toa_lb_injector::{Engine, datapath, nft};

#[derive(Parser)]
#[command(name = "toa-lb", version, about = "FULLNAT L4 load balancer with TOA (Obtain Client IP Address)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer (root).
    Run {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// The control socket (`toa-lb ctl`).
        #[arg(long, default_value = toa_lb_injector::ctl::SOCKET)]
        socket: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a running toa-lb: listeners | backends | stats | set LISTENER obtain-client-ip
    /// off|toa|transparent | add-backend LISTENER ADDR [WEIGHT] | remove-backend LISTENER ADDR |
    /// drain|undrain LISTENER ADDR.
    Ctl {
        /// The control socket.
        #[arg(long, default_value = toa_lb_injector::ctl::SOCKET)]
        socket: PathBuf,
        /// The request, e.g. `set 203.0.113.10:80 obtain-client-ip off`.
        #[arg(required = true, num_args = 1..)]
        request: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Structured logs on stderr; RUST_LOG=debug (or toa_lb=trace) for more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Check { config } => match LbConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Run { config, socket } => run(&config, &socket),
        Command::Ctl { socket, request } => {
            match toa_lb_injector::ctl::request(&socket, &request.join(" ")) {
                Ok(answer) if answer.starts_with("error: ") => {
                    eprint!("toa-lb: {}", &answer["error: ".len()..]);
                    ExitCode::FAILURE
                }
                Ok(answer) => {
                    print!("{answer}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("{}: {e} (is toa-lb running? see --socket)", socket.display())),
            }
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    // One clear line for the operator, whatever the log configuration.
    eprintln!("toa-lb: {e}");
    ExitCode::FAILURE
}

fn run(path: &std::path::Path, socket: &std::path::Path) -> ExitCode {
    let config = match LbConfig::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !nix::unistd::Uid::effective().is_root() {
        return fail("toa-lb needs root (raw sockets, nftables)");
    }
    let client = match datapath::interface(&config.client_interface) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let backend = match datapath::interface(&config.backend_interface) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let vips: Vec<_> = config.engine.listeners.iter().map(|l| l.vip.ip()).collect();
    if let Err(e) = datapath::check_vips(&client, &vips) {
        return fail(e);
    }
    let mut owned = vips.clone();
    owned.extend(config.engine.snat.iter().copied());
    if let Err(e) = nft::install(&owned) {
        return fail(e);
    }
    let mut engine_config = config.engine.clone();
    engine_config.snat_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
        .unwrap_or(0);
    let engine = match Engine::new(engine_config) {
        Ok(e) => Arc::new(std::sync::Mutex::new(e)),
        Err(e) => return fail(e),
    };
    let stop = Arc::new(AtomicBool::new(false));
    // A signal only sets the flag; the datapath threads notice within 200 ms.
    if let Err(e) = stop_on_signals(stop.clone()) {
        let _ = nft::remove();
        return fail(format!("cannot handle SIGINT/SIGTERM: {e}"));
    }
    if let Err(e) = toa_lb_injector::ctl::serve(socket, engine.clone(), stop.clone()) {
        let _ = nft::remove();
        return fail(format!("control socket {}: {e}", socket.display()));
    }
    if let Some(addr) = config.metrics {
        if let Err(e) = toa_lb_injector::ctl::serve_metrics(addr, engine.clone(), stop.clone()) {
            let _ = nft::remove();
            return fail(format!("metrics on {addr}: {e}"));
        }
    }
    if let Some(check) = config.health {
        toa_lb_injector::health::spawn(engine.clone(), check, stop.clone());
    }
    for l in &config.engine.listeners {
        let backends: Vec<String> = l.backends.iter().map(|b| b.addr.to_string()).collect();
        eprintln!(
            "toa-lb: listener {} -> {} (obtain_client_ip {:?})",
            l.vip,
            backends.join(", "),
            l.obtain_client_ip
        );
    }
    tracing::info!(clients = %client.name, backends = %backend.name, "running on the interfaces");
    let result = datapath::run(engine, &client, &backend, &owned, stop.clone());
    let cleanup = nft::remove();
    if let Err(e) = result {
        return fail(e);
    }
    if let Err(e) = cleanup {
        return fail(e);
    }
    tracing::info!("stopped, nftables rules removed");
    ExitCode::SUCCESS
}

/// Sets `flag` on SIGINT or SIGTERM: both are blocked in this thread (and so
/// in every thread started later) and a thread waits for them with sigwait.
fn stop_on_signals(flag: Arc<AtomicBool>) -> nix::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::SIGINT);
    set.add(nix::sys::signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    Ok(())
}
