//! `toa-lb ctl`: live control over a unix socket (root only, mode 0600).
//!
//! One request per connection, one line each way and back:
//! `listeners`, `backends`, `stats`, `set LISTENER obtain-client-ip
//! off|toa|transparent`, `add-backend LISTENER ADDR [WEIGHT]`, `remove-backend
//! LISTENER ADDR`, `drain|undrain LISTENER ADDR`, `reload`, where LISTENER is
//! the VIP (`203.0.113.10:80`, `udp/203.0.113.10:53` for a UDP listener) or
//! its index. A switch applies to new flows; existing flows keep the mode
//! they started with.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use toa_core::Format;

use crate::config::{ObtainClientIp, Protocol};
use crate::shards::{Locked, Shards};

/// The default socket path.
pub const SOCKET: &str = "/run/toa-lb.sock";

/// Re-reads the configuration file and applies it (the driver's job: it
/// knows the file, the interfaces and the nftables rules). Returns what
/// changed, or why the new configuration was rejected (the old one stays).
pub type Reload = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves the control socket at `path` until `stop` is set.
pub fn serve(path: &Path, shards: Arc<Shards>, reload: Reload, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path); // a stale socket from a crash
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let path = path.to_owned();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = answer(stream, &shards, &reload);
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

fn answer(stream: UnixStream, shards: &Shards, reload: &Reload) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = match line.trim() {
        // Not under the engines' locks: the reload takes them itself.
        "reload" => reload(),
        request => handle(&mut shards.lock(), request),
    };
    let mut stream = stream;
    match reply {
        Ok(text) => write!(stream, "{text}"),
        Err(e) => writeln!(stream, "error: {e}"),
    }
}

/// Runs one control request against the engines.
pub fn handle(engine: &mut Locked<'_>, request: &str) -> Result<String, String> {
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["listeners"] => {
            let mut out = String::new();
            for (i, l) in engine.listeners().iter().enumerate() {
                let backends: Vec<String> = l
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(b, backend)| {
                        let down = engine.backend_up(i, b) == Some(false);
                        format!("{}{}", backend.addr, if down { "(down)" } else { "" })
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "{i} {} obtain-client-ip={} backends={}",
                    listener_name(l),
                    mode_name(l.obtain_client_ip),
                    backends.join(",")
                );
            }
            Ok(out)
        }
        ["stats"] => {
            let mut out = format!("flows {}\n", engine.flow_count());
            for (i, l) in engine.listeners().iter().enumerate() {
                if let Some(c) = engine.counters(i) {
                    let _ = writeln!(
                        out,
                        "{} flows={} injected={} no_room={} stripped={} evicted={} expired={} to_backend={} to_client={} bytes_to_backend={} bytes_to_client={} dropped_malformed={} dropped_no_flow={} dropped_table_full={} dropped_no_snat={} dropped_no_backend={}",
                        listener_name(l),
                        c.flows,
                        c.injected,
                        c.no_room,
                        c.stripped,
                        c.evicted,
                        c.expired,
                        c.to_backend,
                        c.to_client,
                        c.bytes_to_backend,
                        c.bytes_to_client,
                        c.dropped_malformed,
                        c.dropped_no_flow,
                        c.dropped_table_full,
                        c.dropped_no_snat,
                        c.dropped_no_backend
                    );
                }
            }
            let drops = datapath_drops(engine).map(|(reason, n)| format!("{reason}={n}")).join(" ");
            let _ = writeln!(out, "datapath dropped {drops}");
            for (((proto, vip), backend), c) in engine.backend_counters() {
                let _ = writeln!(
                    out,
                    "{} backend {backend} flows={} to_backend={} to_client={} bytes_to_backend={} bytes_to_client={}",
                    key_name(proto, vip),
                    c.flows,
                    c.to_backend,
                    c.to_client,
                    c.bytes_to_backend,
                    c.bytes_to_client
                );
            }
            Ok(out)
        }
        ["backends"] => {
            let mut out = String::new();
            for (i, l) in engine.listeners().iter().enumerate() {
                for (b, backend) in l.backends.iter().enumerate() {
                    let state = match (engine.backend_up(i, b), engine.is_draining(i, backend.addr)) {
                        (_, true) => "draining",
                        (Some(false), _) => "down",
                        _ => "up",
                    };
                    let _ = writeln!(
                        out,
                        "{} {} weight={} {state}",
                        listener_name(l),
                        backend.addr,
                        backend.weight
                    );
                }
            }
            Ok(out)
        }
        ["add-backend", listener, addr, rest @ ..] => {
            let index = listener_index(engine, listener)?;
            let addr: std::net::SocketAddr =
                addr.parse().map_err(|_| format!("{addr:?} is not an address:port"))?;
            let weight = match rest {
                [] => 1,
                [w] => w.parse().map_err(|_| format!("weight {w:?} is not a number"))?,
                _ => return Err("usage: add-backend LISTENER ADDR [WEIGHT]".into()),
            };
            engine.apply(|e| e.add_backend(index, crate::config::Backend { addr, weight }))?;
            Ok(format!("{} + {addr}\n", listener_name(&engine.listeners()[index])))
        }
        ["remove-backend", listener, addr] => {
            let index = listener_index(engine, listener)?;
            let addr = addr.parse().map_err(|_| format!("{addr:?} is not an address:port"))?;
            engine.apply(|e| e.remove_backend(index, addr))?;
            Ok(format!("{} - {addr} (its connections go on)\n", listener_name(&engine.listeners()[index])))
        }
        [verb @ ("drain" | "undrain"), listener, addr] => {
            let index = listener_index(engine, listener)?;
            let addr = addr.parse().map_err(|_| format!("{addr:?} is not an address:port"))?;
            engine.apply(|e| e.drain_backend(index, addr, *verb == "drain"))?;
            Ok(format!("{} {addr} {verb}ed\n", listener_name(&engine.listeners()[index])))
        }
        ["set", listener, "obtain-client-ip", mode] => {
            let index = listener_index(engine, listener)?;
            let current = engine.listeners()[index].obtain_client_ip;
            let mode = match *mode {
                "off" => ObtainClientIp::Off,
                "transparent" => ObtainClientIp::Transparent,
                "toa" => ObtainClientIp::Toa(match current {
                    ObtainClientIp::Toa(format) => format,
                    ObtainClientIp::Off | ObtainClientIp::Transparent => Format::Toa,
                }),
                other => return Err(format!("unknown mode {other:?}: off, toa or transparent")),
            };
            engine.apply(|e| e.set_obtain_client_ip(index, mode)).map_err(|e| e.to_string())?;
            Ok(format!(
                "{} obtain-client-ip={} (new flows)\n",
                listener_name(&engine.listeners()[index]),
                mode_name(mode)
            ))
        }
        _ => Err(format!(
            "unknown request {request:?}: listeners | backends | stats | set LISTENER obtain-client-ip off|toa|transparent | add-backend LISTENER ADDR [WEIGHT] | remove-backend LISTENER ADDR | drain|undrain LISTENER ADDR | reload"
        )),
    }
}

/// How a listener is named: its VIP, with `udp/` before a UDP one.
pub fn listener_name(l: &crate::config::ListenerConfig) -> String {
    key_name(l.protocol, l.vip)
}

fn key_name(proto: Protocol, vip: std::net::SocketAddr) -> String {
    match proto {
        Protocol::Tcp => vip.to_string(),
        Protocol::Udp => format!("udp/{vip}"),
    }
}

/// A listener by name (`203.0.113.10:80`, `udp/203.0.113.10:53`, `tcp/...`) or index.
fn listener_index(engine: &Locked<'_>, listener: &str) -> Result<usize, String> {
    let name = listener.strip_prefix("tcp/").unwrap_or(listener);
    engine
        .listeners()
        .iter()
        .position(|l| listener_name(l) == name)
        .or_else(|| listener.parse::<usize>().ok().filter(|i| *i < engine.listeners().len()))
        .ok_or_else(|| format!("no listener {listener}; see `toa-lb ctl listeners`"))
}

fn mode_name(mode: ObtainClientIp) -> String {
    match mode {
        ObtainClientIp::Off => "off".into(),
        ObtainClientIp::Transparent => "transparent".into(),
        ObtainClientIp::Toa(format) => format!("toa({format})"),
    }
}

/// A counter series: name, help text, and how to read it from a listener's counters.
type Series = (&'static str, &'static str, fn(&crate::engine::Counters) -> u64);

/// The same for a backend's counters.
type BackendSeries = (&'static str, &'static str, fn(&crate::engine::BackendCounters) -> u64);

/// The counters in the Prometheus text format.
pub fn metrics(engine: &Locked<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP toa_lb_flows Flows in the table.\n# TYPE toa_lb_flows gauge\ntoa_lb_flows {}",
        engine.flow_count()
    );
    let series: [Series; 12] = [
        ("toa_lb_flows_created_total", "Flows created.", |c| c.flows),
        ("toa_lb_flows_evicted_total", "Half-open flows evicted under a SYN flood.", |c| c.evicted),
        ("toa_lb_flows_expired_total", "Flows that timed out.", |c| c.expired),
        ("toa_lb_toa_injected_total", "TOA options written.", |c| c.injected),
        ("toa_lb_toa_no_room_total", "Segments with no room for the TOA.", |c| c.no_room),
        ("toa_lb_toa_stripped_total", "TOA options removed from what clients sent.", |c| c.stripped),
        ("toa_lb_packets_to_backend_total", "Packets forwarded to backends.", |c| c.to_backend),
        ("toa_lb_packets_to_client_total", "Packets forwarded to clients.", |c| c.to_client),
        ("toa_lb_bytes_to_backend_total", "IP bytes forwarded to backends.", |c| c.bytes_to_backend),
        ("toa_lb_bytes_to_client_total", "IP bytes forwarded to clients.", |c| c.bytes_to_client),
        ("toa_lb_mss_clamped_total", "SYN-ACKs whose MSS was lowered.", |c| c.mss_clamped),
        ("toa_lb_health_changes_total", "Backends that went down or came back.", |c| c.health_changes),
    ];
    for (name, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, l) in engine.listeners().iter().enumerate() {
            if let Some(c) = engine.counters(i) {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(l), get(&c));
            }
        }
    }
    let _ = writeln!(out, "# HELP toa_lb_backend_up Whether health checks say the backend is up.");
    let _ = writeln!(out, "# TYPE toa_lb_backend_up gauge");
    for (i, l) in engine.listeners().iter().enumerate() {
        for (b, backend) in l.backends.iter().enumerate() {
            let up = u8::from(engine.backend_up(i, b) != Some(false));
            let _ = writeln!(out, "toa_lb_backend_up{{{},backend=\"{}\"}} {up}", labels(l), backend.addr);
        }
    }
    let _ = writeln!(
        out,
        "# HELP toa_lb_dropped_total Packets dropped, by reason.\n# TYPE toa_lb_dropped_total counter"
    );
    for (i, l) in engine.listeners().iter().enumerate() {
        if let Some(c) = engine.counters(i) {
            for (reason, n) in [
                ("malformed", c.dropped_malformed),
                ("no_flow", c.dropped_no_flow),
                ("table_full", c.dropped_table_full),
                ("no_snat_port", c.dropped_no_snat),
                ("no_backend", c.dropped_no_backend),
            ] {
                let _ = writeln!(out, "toa_lb_dropped_total{{{},reason=\"{reason}\"}} {n}", labels(l));
            }
        }
    }
    let per_backend: [BackendSeries; 5] = [
        ("toa_lb_backend_flows_total", "Flows given to the backend.", |c| c.flows),
        ("toa_lb_backend_packets_to_backend_total", "Packets sent to the backend.", |c| c.to_backend),
        ("toa_lb_backend_packets_to_client_total", "Packets from the backend.", |c| c.to_client),
        ("toa_lb_backend_bytes_to_backend_total", "IP bytes sent to the backend.", |c| c.bytes_to_backend),
        ("toa_lb_backend_bytes_to_client_total", "IP bytes from the backend.", |c| c.bytes_to_client),
    ];
    let backends = engine.backend_counters();
    for (name, help, get) in per_backend {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (((proto, vip), backend), c) in &backends {
            let _ = writeln!(
                out,
                "{name}{{listener=\"{vip}\",protocol=\"{proto}\",backend=\"{backend}\"}} {}",
                get(c)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP toa_lb_datapath_dropped_total Frames the datapath dropped, by reason.\n# TYPE toa_lb_datapath_dropped_total counter"
    );
    for (reason, n) in datapath_drops(engine) {
        let _ = writeln!(out, "toa_lb_datapath_dropped_total{{reason=\"{reason}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP toa_lb_unparsed_total Packets that were not valid IP.\n# TYPE toa_lb_unparsed_total counter\ntoa_lb_unparsed_total {}",
        engine.unparsed()
    );
    out
}

/// The datapath's own drops, by reason.
fn datapath_drops(engine: &Locked<'_>) -> [(&'static str, u64); 3] {
    let d = engine.datapath();
    [
        ("truncated", d.truncated.load(Ordering::Relaxed)),
        ("vlan", d.vlan.load(Ordering::Relaxed)),
        ("tx_full", d.tx_dropped.load(Ordering::Relaxed)),
    ]
}

/// The labels naming a listener.
fn labels(l: &crate::config::ListenerConfig) -> String {
    format!("listener=\"{}\",protocol=\"{}\"", l.vip, l.protocol)
}

/// Serves `GET /metrics` (Prometheus text format) on `addr` until `stop` is set.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    shards: Arc<Shards>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let mut request = String::new();
            let _ = BufReader::new(&stream).read_line(&mut request);
            let mut stream = stream;
            let (status, body) = if request.starts_with("GET /metrics ") {
                ("200 OK", metrics(&shards.lock()))
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

/// Sends one request to a running `toa-lb` and returns its answer.
pub fn request(path: &Path, request: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    writeln!(stream, "{request}")?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    Ok(answer)
}
