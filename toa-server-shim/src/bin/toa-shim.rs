//! `toa-shim`: the backend operator's tool.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use toa_core::{Format, Formats};
use toa_server_shim::capture::{self, LiveOptions};
use toa_server_shim::inspect::{Inspector, Record, Summary, parse_hex};
use toa_server_shim::trust::{TrustPolicy, TrustedSources};

#[path = "../cli_assets.rs"]
mod cli_assets;
use cli_assets::Assets;

#[derive(Parser)]
#[command(
    name = "toa-shim",
    version,
    about = "Recover and inspect client addresses sent by TOA load balancers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode the TOA option in packets: does the load balancer send it, and from where?
    Inspect(InspectArgs),
    /// The kernel helper: make unmodified servers in a cgroup see the client (root).
    #[command(subcommand)]
    Ebpf(EbpfCommand),
    /// Shell completions and man pages.
    #[command(subcommand)]
    Assets(Assets),
}

#[derive(Subcommand)]
enum EbpfCommand {
    /// Load and attach the helper; it stays attached after this command exits.
    Attach(AttachArgs),
    /// Show where the helper is attached, whom it trusts, and its counters.
    Status,
    /// Detach the helper and remove every pin (also after an interrupted attach).
    Detach,
    /// Serve the helper's counters to Prometheus, or write them for node_exporter (root).
    Metrics(MetricsArgs),
}

#[derive(Args)]
struct MetricsArgs {
    /// Serve `GET /metrics` here (default 127.0.0.1:9948 unless only --textfile is given).
    /// Loopback by default: put a non-loopback address only where the network is trusted.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Also (or only) write DIR/toa_shim.prom for node_exporter's textfile collector,
    /// atomically, every --interval.
    #[arg(long, value_name = "DIR")]
    textfile: Option<PathBuf>,
    /// How often the textfile is rewritten (e.g. 15s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    interval: Duration,
    /// With --textfile: write it once and exit.
    #[arg(long, requires = "textfile")]
    once: bool,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("trusted").required(true).multiple(true))]
struct AttachArgs {
    /// The cgroup (v2) whose programs see clients; default: the root, i.e. every program.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// A trusted load-balancer source CIDR (repeatable).
    #[arg(long, value_name = "CIDR", group = "trusted")]
    trust: Vec<TrustedSources>,
    /// A named set of trusted sources: huawei-elb (100.125.0.0/16).
    #[arg(long, value_name = "NAME", group = "trusted", value_parser = ["huawei-elb"])]
    trust_preset: Vec<String>,
    /// Honour a TOA from any source (a client could forge its address).
    #[arg(long, group = "trusted", conflicts_with_all = ["trust", "trust_preset"])]
    trust_any: bool,
    /// Formats to accept, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "toa,toa6")]
    formats: Vec<Format>,
    /// TCP only: no UDP (UOA) programs.
    #[arg(long, conflicts_with_all = ["udp_iface", "udp_flows"])]
    no_udp: bool,
    /// An interface of this network namespace whose ingress the UDP program
    /// watches (repeatable); default: every Ethernet interface now present.
    #[arg(long, value_name = "NAME")]
    udp_iface: Vec<String>,
    /// UDP flows remembered (the bound of the helper's LRU maps).
    #[arg(long, value_name = "N", default_value_t = toa_server_shim::ebpf::DEFAULT_UDP_FLOWS,
          value_parser = clap::value_parser!(u32).range(64..=1 << 24))]
    udp_flows: u32,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
struct InspectArgs {
    /// One IPv4 or IPv6 packet, starting at the IP header, as hex.
    #[arg(long, group = "input", value_name = "HEX")]
    hex: Option<String>,
    /// A pcap or pcapng file (Ethernet, Linux cooked v1/v2 or raw IP).
    #[arg(long, group = "input", value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// Capture live on this interface (needs root).
    #[arg(long, group = "input", value_name = "NAME")]
    iface: Option<String>,
    /// With --iface: stop after this many TCP packets.
    #[arg(long, requires = "iface")]
    count: Option<usize>,
    /// With --iface: stop after this long (e.g. 10s, 500ms, 2m).
    #[arg(long, requires = "iface", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// With --iface: capture in promiscuous mode.
    #[arg(long, requires = "iface")]
    promiscuous: bool,
    /// A trusted load-balancer source: CIDR, address or `huawei-elb` (repeatable).
    #[arg(long, value_name = "CIDR")]
    trust: Vec<TrustedSources>,
    /// Formats to decode, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "toa,toa6")]
    formats: Vec<Format>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) =
        text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len()));
    let value: f64 =
        number.parse().map_err(|_| format!("invalid duration {text:?}: use e.g. 10s, 500ms, 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit {unit:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Ebpf(command) => ebpf(command),
        Command::Assets(what) => {
            match cli_assets::run(<Cli as clap::CommandFactory>::command(), NAME, what) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("toa-shim: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

const NAME: &str = "toa-shim";

fn ebpf(command: EbpfCommand) -> ExitCode {
    use toa_server_shim::ebpf;
    let result = match command {
        EbpfCommand::Attach(args) => {
            let policy = if args.trust_any {
                TrustPolicy::any()
            } else {
                let mut sources: Vec<TrustedSources> = args.trust;
                for preset in &args.trust_preset {
                    match preset.parse() {
                        Ok(preset) => sources.push(preset),
                        Err(e) => {
                            eprintln!("toa-shim: {e}");
                            return ExitCode::from(2);
                        }
                    }
                }
                match TrustPolicy::new(sources.into_iter().collect()) {
                    Ok(policy) => policy,
                    Err(e) => {
                        eprintln!("toa-shim: {e}");
                        return ExitCode::from(2);
                    }
                }
            };
            let formats = args.formats.iter().fold(Formats::NONE, |f, format| f.with(*format));
            let udp = (!args.no_udp)
                .then_some(ebpf::UdpOptions { interfaces: args.udp_iface, flows: args.udp_flows });
            let options = ebpf::AttachOptions { cgroup: args.cgroup, policy, formats, udp };
            ebpf::attach(&options).map(|cgroup| {
                println!("attached to cgroup {} (pinned under {})", cgroup.display(), ebpf::PIN_DIR);
                if let Ok(ebpf::Status { udp: Some(udp), .. }) = ebpf::status() {
                    println!("udp: watching {} ({} flows at most)", udp.interfaces.join(", "), udp.max_flows);
                }
            })
        }
        EbpfCommand::Status => ebpf::status().map(|status| println!("{status}")),
        EbpfCommand::Detach => ebpf::detach().map(|removed| match removed {
            0 => println!("nothing attached"),
            n => println!("detached: removed {n} pins under {}", ebpf::PIN_DIR),
        }),
        EbpfCommand::Metrics(args) => return metrics(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toa-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The helper's metrics now: `attached 0` when nothing is attached.
fn render_metrics() -> Result<String, toa_server_shim::ebpf::EbpfError> {
    use toa_server_shim::ebpf;
    match ebpf::status() {
        Ok(status) => Ok(ebpf::render_metrics(Some(&status))),
        Err(ebpf::EbpfError::NotAttached) => Ok(ebpf::render_metrics(None)),
        Err(e) => Err(e),
    }
}

/// Writes DIR/toa_shim.prom through a temporary file and a rename, so that
/// node_exporter never reads half of it.
fn write_textfile(dir: &std::path::Path) -> Result<(), String> {
    let text = render_metrics().map_err(|e| e.to_string())?;
    let tmp = dir.join(".toa_shim.prom.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    let path = dir.join("toa_shim.prom");
    std::fs::rename(&tmp, &path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

fn metrics(args: MetricsArgs) -> ExitCode {
    // Fail at start on what would fail every scrape (not root, unreadable pins).
    if let Err(e) = render_metrics() {
        eprintln!("toa-shim: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(dir) = &args.textfile {
        if let Err(e) = write_textfile(dir) {
            eprintln!("toa-shim: {e}");
            return ExitCode::FAILURE;
        }
        if args.once {
            return ExitCode::SUCCESS;
        }
    }
    let listen = match (args.listen, &args.textfile) {
        (Some(addr), _) => Some(addr),
        (None, None) => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9948))),
        (None, Some(_)) => None,
    };
    if let Some(dir) = args.textfile.clone() {
        let interval = args.interval;
        let file = dir.join("toa_shim.prom");
        let writer = std::thread::spawn(move || {
            loop {
                std::thread::sleep(interval);
                if let Err(e) = write_textfile(&dir) {
                    eprintln!("toa-shim: {e}");
                }
            }
        });
        if listen.is_none() {
            eprintln!("toa-shim: writing {} every {interval:?}", file.display());
            let _ = writer.join();
            return ExitCode::FAILURE;
        }
    }
    let Some(addr) = listen else { return ExitCode::SUCCESS };
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("toa-shim: listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !addr.ip().is_loopback() {
        eprintln!("toa-shim: note: {addr} is not loopback; the counters are readable from other hosts");
    }
    eprintln!("toa-shim: serving the helper's metrics on http://{addr}/metrics");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // One short request at a time: a scraper, not the world.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut request = String::new();
        let _ = io::BufRead::read_line(&mut io::BufReader::new(&stream), &mut request);
        let (status, body) = if !request.starts_with("GET /metrics ") {
            ("404 Not Found", "try /metrics\n".to_owned())
        } else {
            match render_metrics() {
                Ok(text) => ("200 OK", text),
                Err(e) => ("500 Internal Server Error", format!("{e}\n")),
            }
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    ExitCode::FAILURE
}

/// Prints records as they come; keeps the summary.
struct Printer<W: Write> {
    out: W,
    json: bool,
    summary: Summary,
}

impl<W: Write> Printer<W> {
    fn print(&mut self, record: &Record) -> io::Result<()> {
        self.summary.count(record);
        if self.json {
            writeln!(self.out, "{}", record.to_json())
        } else {
            match record {
                Record::Segment(s) if !s.toa.is_empty() => {
                    writeln!(self.out, "{record}, {}", trust_note(s.trusted))
                }
                Record::Datagram(d) => writeln!(self.out, "{record}, {}", trust_note(d.trusted)),
                _ => writeln!(self.out, "{record}"),
            }
        }
    }
}

fn trust_note(trusted: bool) -> &'static str {
    if trusted { "trusted LB" } else { "UNTRUSTED source: a backend must ignore it" }
}

fn inspect(args: InspectArgs) -> ExitCode {
    let formats = args.formats.iter().fold(Formats::NONE, |f, format| f.with(*format));
    let trust: TrustedSources = args.trust.into_iter().collect();
    let inspector = Inspector::new(formats, trust.clone());
    let stdout = io::stdout();
    let mut printer =
        Printer { out: BufWriter::new(stdout.lock()), json: args.json, summary: Summary::default() };
    let mut write_failed = None;
    let mut on_packet = |ip: &[u8], printer: &mut Printer<_>| -> bool {
        let Some(record) = inspector.inspect(ip) else { return false };
        if let Err(e) = printer.print(&record) {
            write_failed.get_or_insert(e);
        }
        true
    };

    let result = if let Some(hex) = &args.hex {
        let bytes = match parse_hex(hex) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("toa-shim: --hex: {e}");
                return ExitCode::from(2);
            }
        };
        match inspector.inspect(&bytes) {
            None => {
                eprintln!("toa-shim: the packet carries neither TCP nor a UOA");
                return ExitCode::from(2);
            }
            Some(record) => {
                let malformed = matches!(record, Record::Malformed(_));
                on_packet(&bytes, &mut printer);
                let _ = printer.out.flush();
                return if malformed { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
        }
    } else if let Some(path) = &args.pcap {
        capture::read_file(path, |ip| {
            on_packet(ip, &mut printer);
        })
        .map(|_| ())
    } else if let Some(iface) = &args.iface {
        let options = LiveOptions { count: args.count, timeout: args.timeout, promiscuous: args.promiscuous };
        let mode = if options.promiscuous { "promiscuous" } else { "not promiscuous" };
        capture::live(
            iface,
            &options,
            || eprintln!("toa-shim: capturing on {iface} ({mode}); Ctrl-C to stop"),
            |ip| {
                let counted = on_packet(ip, &mut printer);
                // Live output is read as it happens.
                let _ = printer.out.flush();
                counted
            },
        )
    } else {
        unreachable!("clap requires one input");
    };

    let _ = printer.out.flush();
    if let Err(e) = result {
        eprintln!("toa-shim: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(e) = write_failed {
        if e.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("toa-shim: writing output: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !args.json {
        let trust_note = if trust.is_empty() { " (no --trust given: nothing is trusted)" } else { "" };
        eprintln!("toa-shim: {}{trust_note}", printer.summary);
    }
    ExitCode::SUCCESS
}
