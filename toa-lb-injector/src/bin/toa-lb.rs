//! `toa-lb`: a FULLNAT L4 load balancer that writes the client's address
//! into a TOA option ("Obtain Client IP Address"), and `toa-lb inject`, the
//! TOA injector alone for a NAT someone else runs.
// The doc comments below are clap's help text (`[WEIGHT]` is an optional argument, not a link).
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use toa_lb_injector::control::ctl::{self, Reply, Request};
use toa_lb_injector::file::LbConfig;
use toa_lb_injector::inject;

#[path = "../../../toa-server-shim/src/cli_assets.rs"]
mod cli_assets;
use cli_assets::Assets;

#[derive(Parser)]
#[command(name = "toa-lb", version, about = "FULLNAT L4 load balancer with TOA (Obtain Client IP Address)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer (root). SIGHUP re-reads the configuration; a bad
    /// one is logged and the running one stays.
    Run {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// The control socket (`toa-lb ctl`).
        #[arg(long, default_value = ctl::SOCKET)]
        socket: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Print the nftables script `run` applies at start (the kernel
        /// datapath's table, or the ring/pnet fence), to review it; nothing
        /// is applied.
        #[arg(long)]
        ruleset: bool,
    },
    /// Talk to a running toa-lb: listeners | backends | stats | set LISTENER obtain-client-ip
    /// off|toa|transparent|uoa | add-backend LISTENER ADDR [WEIGHT] | remove-backend LISTENER ADDR |
    /// drain|undrain LISTENER ADDR | reload (re-read the file, as SIGHUP does, and say why not).
    Ctl {
        /// The control socket.
        #[arg(long, default_value = ctl::SOCKET)]
        socket: PathBuf,
        /// The request, e.g. `set 203.0.113.10:80 obtain-client-ip off`.
        #[arg(required = true, num_args = 1..)]
        request: Vec<String>,
    },
    /// The TOA injector alone (root), for a NAT you already run: it attaches
    /// to the interface clients come in on and stays after this command exits.
    Inject {
        #[command(subcommand)]
        action: InjectAction,
    },
    /// Shell completions and man pages.
    #[command(subcommand)]
    Assets(Assets),
}

#[derive(Subcommand)]
enum InjectAction {
    /// Attach to an interface for the listed VIP:PORTs (as clients address them, before the NAT).
    Attach {
        /// The interface clients come in on.
        #[arg(long)]
        iface: String,
        /// A VIP:PORT (TCP); repeat for more.
        #[arg(long = "listener", required = true)]
        listeners: Vec<SocketAddr>,
        /// The TOA format: toa, toa6, ali-v6, tencent (an IPv6 client always gets an IPv6 format).
        #[arg(long, default_value = "toa")]
        format: String,
        /// Which client segments carry it: syn, ack, data, comma separated.
        #[arg(long, default_value = "syn,ack")]
        placement: String,
        /// Lower the backends' SYN-ACK MSS by the option's size: auto (only
        /// with data placement, the one that grows data segments), on, off.
        #[arg(long, default_value = "auto")]
        mss_clamp: String,
        /// Flows remembered between SYN and handshake ACK (the oldest are forgotten first).
        #[arg(long, default_value_t = 65536)]
        flows: u32,
        /// Where the injector's state is pinned.
        #[arg(long, default_value = inject::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Show the attached injectors: listeners and counters.
    Status {
        /// Where the injector's state is pinned.
        #[arg(long, default_value = inject::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach from an interface (default: every one) and remove the pins.
    Detach {
        /// The interface.
        #[arg(long)]
        iface: Option<String>,
        /// Where the injector's state is pinned.
        #[arg(long, default_value = inject::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // Structured logs on stderr; RUST_LOG=debug (or toa_lb=trace) for more.
    // Colours only on a terminal: a log file or journald gets plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Check { config, ruleset } => run_check(&config, ruleset),
        Command::Run { config, socket } => {
            toa_lb_injector::daemon::run(&config, &socket).map_err(|e| e.to_string())
        }
        Command::Ctl { socket, request } => run_ctl(&socket, &request.join(" ")),
        Command::Inject { action } => run_inject(action),
        Command::Assets(what) => cli_assets::run(<Cli as clap::CommandFactory>::command(), NAME, what),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line for the operator, whatever the log configuration.
            eprintln!("toa-lb: {e}");
            ExitCode::FAILURE
        }
    }
}

const NAME: &str = "toa-lb";

fn run_check(path: &std::path::Path, ruleset: bool) -> Result<(), String> {
    let config = LbConfig::load(path).map_err(|e| e.to_string())?;
    if ruleset {
        let script = toa_lb_injector::daemon::nft_script(&config)?;
        println!(
            "# What `toa-lb run --config {}` applies at start; `nft -c -f -` checks it here.",
            path.display()
        );
        print!("{script}");
    } else {
        println!("{}: ok", path.display());
    }
    Ok(())
}

fn run_ctl(socket: &std::path::Path, request: &str) -> Result<(), String> {
    let request: Request = request.parse().map_err(|e: ctl::RequestError| e.to_string())?;
    match ctl::request(socket, &request) {
        Ok(Reply::Ok(text)) => {
            print!("{text}");
            Ok(())
        }
        Ok(Reply::Error(e)) => Err(e),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(format!("{}: {e}", socket.display())),
        Err(e) => Err(format!("{}: {e} (is toa-lb running? see --socket)", socket.display())),
    }
}

fn run_inject(action: InjectAction) -> Result<(), String> {
    match action {
        InjectAction::Attach { iface, listeners, format, placement, mss_clamp, flows, pin_dir } => {
            let format = format
                .parse()
                .map_err(|_| format!("unknown --format {format:?}: toa, toa6, ali-v6, tencent"))?;
            let placement = inject::parse_placement(&placement).map_err(|e| e.to_string())?;
            let mss_clamp =
                mss_clamp.parse().map_err(|_| format!("unknown --mss-clamp {mss_clamp:?}: auto, on, off"))?;
            let options = inject::AttachOptions {
                interface: iface.clone(),
                listeners,
                format,
                placement,
                mss_clamp,
                flows,
                pin_dir,
            };
            inject::attach(&options).map_err(|e| e.to_string())?;
            println!("toa-lb inject: attached to {iface} ({} listeners)", options.listeners.len());
            Ok(())
        }
        InjectAction::Status { pin_dir } => {
            print!("{}", inject::status(&pin_dir).map_err(|e| e.to_string())?);
            Ok(())
        }
        InjectAction::Detach { iface, pin_dir } => {
            let done = inject::detach(&pin_dir, iface.as_deref()).map_err(|e| e.to_string())?;
            println!("toa-lb inject: detached from {}", done.join(", "));
            Ok(())
        }
    }
}
