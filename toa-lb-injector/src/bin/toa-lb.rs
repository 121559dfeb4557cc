//! `toa-lb`: a FULLNAT L4 load balancer that writes the client's address
//! into a TOA option ("Obtain Client IP Address").

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use toa_lb_injector::datapath::{self, Owned};
use toa_lb_injector::file::{Datapath, LbConfig};
use toa_lb_injector::health::HealthCheck;
use toa_lb_injector::shards::Shards;
use toa_lb_injector::{ctl, nft};

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
    /// drain|undrain LISTENER ADDR | reload (re-read the file, as SIGHUP does, and say why not).
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

/// What a reload needs: the file, the current configuration, and the parts
/// of the running LB it updates.
struct Running {
    path: PathBuf,
    current: Mutex<LbConfig>,
    shards: Arc<Shards>,
    owned: Owned,
    health: Arc<Mutex<Option<HealthCheck>>>,
}

impl Running {
    /// Re-reads the file and applies it, with the guarantees of a live switch
    /// (flows keep their backend and mode). A configuration that does not
    /// load, or changes what only a restart can, is rejected and the running
    /// one stays.
    fn reload(&self) -> Result<String, String> {
        let new = LbConfig::load(&self.path).map_err(|e| e.to_string())?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let restart = |what: &str| Err(format!("{what} changed: that needs a restart; nothing was reloaded"));
        if (&new.client_interface, &new.backend_interface)
            != (&current.client_interface, &current.backend_interface)
        {
            return restart("client_interface or backend_interface");
        }
        if new.metrics != current.metrics {
            return restart("metrics");
        }
        if (new.datapath, new.workers, new.busy_poll)
            != (current.datapath, current.workers, current.busy_poll)
        {
            return restart("datapath, workers or busy_poll_us");
        }
        let client = datapath::interface(&new.client_interface).map_err(|e| e.to_string())?;
        let vips: Vec<_> = new.engine.listeners.iter().map(|l| l.vip.ip()).collect();
        datapath::check_vips(&client, &vips).map_err(|e| e.to_string())?;
        let mut engines = self.shards.lock();
        // Answer for the new VIPs and SNAT addresses, and for the SNAT addresses
        // flows still use; nftables first, so a failure there changes nothing.
        let mut owned: HashSet<IpAddr> = vips.iter().chain(&new.engine.snat).copied().collect();
        owned.extend(engines.snat_in_use());
        let list: Vec<IpAddr> = owned.iter().copied().collect();
        let interfaces = [new.client_interface.as_str(), new.backend_interface.as_str()];
        nft::install(&list, &interfaces)?;
        let flows_before = engines.flow_count();
        if let Err(e) = engines.apply(|e| e.reconfigure(new.engine.clone())) {
            // (The file was validated already: this is not expected.) Put the old rules back.
            let old: Vec<IpAddr> =
                self.owned.read().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
            if let Err(nft) = nft::install(&old, &interfaces) {
                tracing::error!("restoring the nftables rules after a failed reload: {nft}");
            }
            return Err(e.to_string());
        }
        let dropped = flows_before - engines.flow_count();
        drop(engines);
        *self.owned.write().unwrap_or_else(PoisonError::into_inner) = owned;
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = new.health;
        let summary = format!(
            "reloaded {}: {} listeners ({}); {dropped} flows of removed listeners dropped\n",
            self.path.display(),
            new.engine.listeners.len(),
            new.engine.listeners.iter().map(ctl::listener_name).collect::<Vec<_>>().join(", ")
        );
        *current = new;
        Ok(summary)
    }
}

fn run(path: &std::path::Path, socket: &std::path::Path) -> ExitCode {
    let config = match LbConfig::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !nix::unistd::Uid::effective().is_root() {
        return fail("toa-lb needs root (raw sockets, nftables)");
    }
    // Block the signals before any thread starts, so that only the signal
    // thread (started below) takes them.
    let signals = {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(signal);
        }
        set
    };
    if let Err(e) = signals.thread_block() {
        return fail(format!("cannot block SIGINT/SIGTERM/SIGHUP: {e}"));
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
    let owned: HashSet<IpAddr> = vips.iter().chain(&config.engine.snat).copied().collect();
    let interfaces = [config.client_interface.as_str(), config.backend_interface.as_str()];
    if let Err(e) = nft::install(&owned.iter().copied().collect::<Vec<_>>(), &interfaces) {
        return fail(e);
    }
    let mut engine_config = config.engine.clone();
    engine_config.snat_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
        .unwrap_or(0);
    let workers = match config.datapath {
        Datapath::Ring => config.workers,
        Datapath::Pnet => 1,
    };
    let shards = match Shards::new(&engine_config, workers) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let _ = nft::remove();
            return fail(e);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(Running {
        path: path.to_owned(),
        current: Mutex::new(config.clone()),
        shards: shards.clone(),
        owned: Arc::new(RwLock::new(owned)),
        health: Arc::new(Mutex::new(config.health)),
    });
    // A signal only sets the flag (the datapath notices within 200 ms) or reloads.
    {
        let (stop, running) = (stop.clone(), running.clone());
        std::thread::spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal != Signal::SIGHUP {
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
                match running.reload() {
                    Ok(summary) => tracing::info!("SIGHUP: {}", summary.trim_end()),
                    Err(e) => {
                        tracing::error!("SIGHUP: reload rejected, the running configuration stays: {e}")
                    }
                }
            }
        });
    }
    let reload: ctl::Reload = {
        let running = running.clone();
        Arc::new(move || running.reload())
    };
    if let Err(e) = ctl::serve(socket, shards.clone(), reload, stop.clone()) {
        let _ = nft::remove();
        return fail(format!("control socket {}: {e}", socket.display()));
    }
    if let Some(addr) = config.metrics {
        if let Err(e) = ctl::serve_metrics(addr, shards.clone(), stop.clone()) {
            let _ = nft::remove();
            return fail(format!("metrics on {addr}: {e}"));
        }
    }
    toa_lb_injector::health::spawn(shards.clone(), running.health.clone(), stop.clone());
    for l in &config.engine.listeners {
        let backends: Vec<String> = l.backends.iter().map(|b| b.addr.to_string()).collect();
        eprintln!(
            "toa-lb: listener {} -> {} (obtain_client_ip {:?})",
            ctl::listener_name(l),
            backends.join(", "),
            l.obtain_client_ip
        );
    }
    tracing::info!(clients = %client.name, backends = %backend.name, datapath = ?config.datapath, "running on the interfaces");
    let owned = running.owned.clone();
    let result = match config.datapath {
        Datapath::Ring => {
            toa_lb_injector::ring::run(shards, &client, &backend, owned, config.busy_poll, stop.clone())
        }
        Datapath::Pnet => datapath::run(shards, &client, &backend, owned, stop.clone()),
    };
    stop.store(true, Ordering::Relaxed);
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
