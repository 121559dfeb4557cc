//! `toa-lb ctl`: live control over a unix socket (root only, mode 0600).
//!
//! One request per connection. The client writes one line, a [`Request`] in
//! its text form (`listeners`, `backends`, `stats`, `set LISTENER
//! obtain-client-ip off|toa|transparent|uoa`, `add-backend LISTENER ADDR
//! [WEIGHT]`, `remove-backend LISTENER ADDR`, `drain|undrain LISTENER ADDR`,
//! `reload`), where LISTENER is the VIP (`203.0.113.10:80`,
//! `udp/203.0.113.10:53` for a UDP listener) or its index. The server
//! answers with a [`Reply`]: `ok` or `error` on the first line, then the
//! text. A switch applies to new flows; existing flows keep the mode they
//! started with.

use std::fmt::{self, Write as _};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use toa_core::Format;

use crate::control::Stop;
use crate::datapath::{Balancer, Snapshot};
use crate::engine::config::{Backend, ListenerConfig, ObtainClientIp, Protocol};
use crate::engine::{BackendCounters, Counters, ListenerKey};

/// The default socket path.
pub const SOCKET: &str = "/run/toa-lb.sock";

/// Re-reads the configuration file and applies it (see
/// [`crate::control::reload::Reloader`]). Returns what changed, or why the
/// new configuration was rejected (the old one stays).
pub type Reload = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A listener named in a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerRef {
    /// By its index in `ctl listeners`.
    Index(usize),
    /// By protocol and VIP (`203.0.113.10:80`, `udp/203.0.113.10:53`).
    Key(ListenerKey),
}

/// A mode a request asks for (TOA keeps the listener's format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeRequest {
    /// `off`
    Off,
    /// `toa`
    Toa,
    /// `transparent`
    Transparent,
    /// `uoa` (UDP listeners; the format and count from the configuration,
    /// else `opp`, 3)
    Uoa,
}

/// One control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Each listener: index, name, mode, backends.
    Listeners,
    /// Each backend: weight and state.
    Backends,
    /// Every counter.
    Stats,
    /// Re-read the configuration file.
    Reload,
    /// Switch a listener's mode for new flows.
    Set {
        /// Which listener.
        listener: ListenerRef,
        /// The new mode.
        mode: ModeRequest,
    },
    /// Add a backend.
    AddBackend {
        /// Which listener.
        listener: ListenerRef,
        /// The backend.
        addr: SocketAddr,
        /// Its weight.
        weight: u32,
    },
    /// Remove a backend (its connections go on).
    RemoveBackend {
        /// Which listener.
        listener: ListenerRef,
        /// The backend.
        addr: SocketAddr,
    },
    /// Drain (`drain: true`) or undrain a backend.
    Drain {
        /// Which listener.
        listener: ListenerRef,
        /// The backend.
        addr: SocketAddr,
        /// Drain, or undrain.
        drain: bool,
    },
}

/// A request that does not parse, said so that it can be fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Not a request at all.
    #[error(
        "unknown request {0:?}: listeners | backends | stats | set LISTENER obtain-client-ip off|toa|transparent|uoa | add-backend LISTENER ADDR [WEIGHT] | remove-backend LISTENER ADDR | drain|undrain LISTENER ADDR | reload"
    )]
    Unknown(String),
    /// A listener that is neither an index nor `[tcp/|udp/]VIP:PORT`.
    #[error("{0:?} is not a listener (an index, or VIP:PORT, or udp/VIP:PORT)")]
    Listener(String),
    /// Not an address and port.
    #[error("{0:?} is not an address:port")]
    Address(String),
    /// Not a weight.
    #[error("weight {0:?} is not a number")]
    Weight(String),
    /// Not a mode.
    #[error("unknown mode {0:?}: off, toa or transparent")]
    Mode(String),
}

impl FromStr for ListenerRef {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(index) = s.parse::<usize>() {
            return Ok(ListenerRef::Index(index));
        }
        let (protocol, vip) = match s.split_once('/') {
            Some(("udp", vip)) => (Protocol::Udp, vip),
            Some(("tcp", vip)) => (Protocol::Tcp, vip),
            Some(_) => return Err(RequestError::Listener(s.to_owned())),
            None => (Protocol::Tcp, s),
        };
        let vip = vip.parse().map_err(|_| RequestError::Listener(s.to_owned()))?;
        Ok(ListenerRef::Key((protocol, vip)))
    }
}

impl fmt::Display for ListenerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerRef::Index(i) => write!(f, "{i}"),
            ListenerRef::Key((protocol, vip)) => f.write_str(&key_name(*protocol, *vip)),
        }
    }
}

impl FromStr for ModeRequest {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(ModeRequest::Off),
            "toa" => Ok(ModeRequest::Toa),
            "transparent" => Ok(ModeRequest::Transparent),
            "uoa" => Ok(ModeRequest::Uoa),
            other => Err(RequestError::Mode(other.to_owned())),
        }
    }
}

impl fmt::Display for ModeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModeRequest::Off => "off",
            ModeRequest::Toa => "toa",
            ModeRequest::Transparent => "transparent",
            ModeRequest::Uoa => "uoa",
        })
    }
}

impl FromStr for Request {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let addr = |a: &str| a.parse::<SocketAddr>().map_err(|_| RequestError::Address(a.to_owned()));
        Ok(match words.as_slice() {
            ["listeners"] => Request::Listeners,
            ["backends"] => Request::Backends,
            ["stats"] => Request::Stats,
            ["reload"] => Request::Reload,
            ["set", listener, "obtain-client-ip", mode] => {
                Request::Set { listener: listener.parse()?, mode: mode.parse()? }
            }
            ["add-backend", listener, a] => {
                Request::AddBackend { listener: listener.parse()?, addr: addr(a)?, weight: 1 }
            }
            ["add-backend", listener, a, w] => Request::AddBackend {
                listener: listener.parse()?,
                addr: addr(a)?,
                weight: w.parse().map_err(|_| RequestError::Weight((*w).to_owned()))?,
            },
            ["remove-backend", listener, a] => {
                Request::RemoveBackend { listener: listener.parse()?, addr: addr(a)? }
            }
            [verb @ ("drain" | "undrain"), listener, a] => {
                Request::Drain { listener: listener.parse()?, addr: addr(a)?, drain: *verb == "drain" }
            }
            _ => return Err(RequestError::Unknown(s.trim().to_owned())),
        })
    }
}

impl fmt::Display for Request {
    /// The wire form, which [`Request::from_str`] parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Listeners => f.write_str("listeners"),
            Request::Backends => f.write_str("backends"),
            Request::Stats => f.write_str("stats"),
            Request::Reload => f.write_str("reload"),
            Request::Set { listener, mode } => write!(f, "set {listener} obtain-client-ip {mode}"),
            Request::AddBackend { listener, addr, weight } => {
                write!(f, "add-backend {listener} {addr} {weight}")
            }
            Request::RemoveBackend { listener, addr } => write!(f, "remove-backend {listener} {addr}"),
            Request::Drain { listener, addr, drain } => {
                write!(f, "{} {listener} {addr}", if *drain { "drain" } else { "undrain" })
            }
        }
    }
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done; the text to show.
    Ok(String),
    /// Refused; why (nothing changed).
    Error(String),
}

impl Reply {
    /// The wire form: `ok` or `error` on the first line, then the text.
    pub fn to_wire(&self) -> String {
        match self {
            Reply::Ok(text) => format!("ok\n{text}"),
            Reply::Error(text) => format!("error\n{text}\n"),
        }
    }

    /// Reads the wire form back.
    pub fn from_wire(wire: &str) -> Option<Reply> {
        let (status, text) = wire.split_once('\n')?;
        match status {
            "ok" => Some(Reply::Ok(text.to_owned())),
            "error" => Some(Reply::Error(text.trim_end().to_owned())),
            _ => None,
        }
    }
}

/// Serves the control socket at `path` until `stop` is set.
pub fn serve(path: &Path, balancer: Arc<dyn Balancer>, reload: Reload, stop: Stop) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path); // a stale socket from a crash
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let path = path.to_owned();
    std::thread::spawn(move || {
        stop.accept_loop(&listener, UnixListener::accept, |(stream, _)| {
            let _ = stream.set_nonblocking(false);
            let _ = answer(stream, balancer.as_ref(), &reload);
        });
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

fn answer(stream: UnixStream, balancer: &dyn Balancer, reload: &Reload) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = match line.parse::<Request>() {
        Ok(Request::Reload) => match reload() {
            Ok(text) => Reply::Ok(text),
            Err(e) => Reply::Error(e),
        },
        Ok(request) => handle(balancer, request),
        Err(e) => Reply::Error(e.to_string()),
    };
    let mut stream = stream;
    stream.write_all(reply.to_wire().as_bytes())
}

/// Runs one request (other than reload) against a running load balancer.
pub fn handle(balancer: &dyn Balancer, request: Request) -> Reply {
    let snapshot = balancer.snapshot();
    let index = |listener: ListenerRef| -> Result<usize, String> {
        let found = match listener {
            ListenerRef::Index(i) => (i < snapshot.listeners.len()).then_some(i),
            ListenerRef::Key(key) => {
                snapshot.listeners.iter().position(|l| (l.config.protocol, l.config.vip) == key)
            }
        };
        found.ok_or_else(|| format!("no listener {listener}; see `toa-lb ctl listeners`"))
    };
    let name = |i: usize| listener_name(&snapshot.listeners[i].config);
    let result = match request {
        Request::Listeners => Ok(listeners_text(&snapshot)),
        Request::Backends => Ok(backends_text(&snapshot)),
        Request::Stats => Ok(stats_text(&snapshot)),
        Request::Reload => Err("reload is answered by the server loop".to_owned()),
        Request::Set { listener, mode } => index(listener).and_then(|i| {
            let mode = match mode {
                ModeRequest::Off => ObtainClientIp::Off,
                ModeRequest::Transparent => ObtainClientIp::Transparent,
                ModeRequest::Toa => {
                    ObtainClientIp::Toa(match snapshot.listeners[i].config.obtain_client_ip {
                        ObtainClientIp::Toa(format) => format,
                        _ => Format::Toa,
                    })
                }
                ModeRequest::Uoa => match snapshot.listeners[i].config.obtain_client_ip {
                    uoa @ ObtainClientIp::Uoa { .. } => uoa,
                    _ => ObtainClientIp::Uoa { format: toa_core::uoa::UoaFormat::Opp, datagrams: 3 },
                },
            };
            balancer.set_mode(i, mode).map_err(|e| e.to_string())?;
            Ok(format!("{} obtain-client-ip={} (new flows)\n", name(i), mode_name(mode)))
        }),
        Request::AddBackend { listener, addr, weight } => index(listener).and_then(|i| {
            balancer.add_backend(i, Backend { addr, weight }).map_err(|e| e.to_string())?;
            Ok(format!("{} + {addr}\n", name(i)))
        }),
        Request::RemoveBackend { listener, addr } => index(listener).and_then(|i| {
            balancer.remove_backend(i, addr).map_err(|e| e.to_string())?;
            Ok(format!("{} - {addr} (its connections go on)\n", name(i)))
        }),
        Request::Drain { listener, addr, drain } => index(listener).and_then(|i| {
            balancer.drain(i, addr, drain).map_err(|e| e.to_string())?;
            Ok(format!("{} {addr} {}\n", name(i), if drain { "drained" } else { "undrained" }))
        }),
    };
    match result {
        Ok(text) => Reply::Ok(text),
        Err(e) => Reply::Error(e),
    }
}

/// `ctl listeners`: index, name, mode, backends (`(down)` marked).
pub fn listeners_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for (i, l) in snapshot.listeners.iter().enumerate() {
        let backends: Vec<String> = l
            .backends
            .iter()
            .map(|b| format!("{}{}", b.backend.addr, if b.up { "" } else { "(down)" }))
            .collect();
        let _ = writeln!(
            out,
            "{i} {} obtain-client-ip={} backends={}",
            listener_name(&l.config),
            mode_name(l.config.obtain_client_ip),
            backends.join(",")
        );
    }
    out
}

/// `ctl backends`: each backend's weight and state.
pub fn backends_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for l in &snapshot.listeners {
        for b in &l.backends {
            let state = match (b.up, b.draining) {
                (_, true) => "draining",
                (false, _) => "down",
                _ => "up",
            };
            let _ = writeln!(
                out,
                "{} {} weight={} {state}",
                listener_name(&l.config),
                b.backend.addr,
                b.backend.weight
            );
        }
    }
    out
}

/// `ctl stats`: every counter, per listener and per backend, by the names of
/// [`Counters::TABLE`] and [`BackendCounters::TABLE`].
pub fn stats_text(snapshot: &Snapshot) -> String {
    let mut out = format!("flows {}\n", snapshot.flows);
    for l in &snapshot.listeners {
        let _ = write!(out, "{}", listener_name(&l.config));
        if let Some(active) = l.flows {
            let _ = write!(out, " active={active}");
        }
        for def in Counters::TABLE {
            let _ = write!(out, " {}={}", def.name, (def.get)(&l.counters));
        }
        out.push('\n');
    }
    // `name=n name=n ...`
    let named = |list: &[(&str, u64)]| {
        list.iter().map(|(name, n)| format!("{name}={n}")).collect::<Vec<_>>().join(" ")
    };
    let _ = writeln!(out, "datapath dropped {}", named(&snapshot.datapath_drops));
    if !snapshot.put_back.is_empty() {
        let _ = writeln!(out, "put back {}", named(&snapshot.put_back));
    }
    for (((protocol, vip), backend), c) in &snapshot.backends {
        let _ = write!(out, "{} backend {backend}", key_name(*protocol, *vip));
        for def in BackendCounters::TABLE {
            let _ = write!(out, " {}={}", def.name, (def.get)(c));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "unparsed {}", snapshot.unparsed);
    out
}

/// How a listener is named: its VIP, with `udp/` before a UDP one.
pub fn listener_name(l: &ListenerConfig) -> String {
    key_name(l.protocol, l.vip)
}

pub(crate) fn key_name(proto: Protocol, vip: SocketAddr) -> String {
    match proto {
        Protocol::Tcp => vip.to_string(),
        Protocol::Udp => format!("udp/{vip}"),
    }
}

/// A mode as `ctl` shows it: `off`, `transparent`, `toa(FORMAT)`, `uoa(FORMAT,N)`.
pub fn mode_name(mode: ObtainClientIp) -> String {
    match mode {
        ObtainClientIp::Off => "off".into(),
        ObtainClientIp::Transparent => "transparent".into(),
        ObtainClientIp::Toa(format) => format!("toa({format})"),
        ObtainClientIp::Uoa { format, datagrams } => format!("uoa({format},{datagrams})"),
    }
}

/// How long [`request`] waits for `toa-lb` to answer.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one request to a running `toa-lb` and returns its reply; a daemon
/// that takes the request but does not answer within [`ANSWER_TIMEOUT`] is
/// an error of kind `TimedOut`, not a wait for ever.
pub fn request(path: &Path, request: &Request) -> std::io::Result<Reply> {
    request_within(path, request, ANSWER_TIMEOUT)
}

fn request_within(path: &Path, request: &Request, timeout: std::time::Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut wire = String::new();
    match writeln!(stream, "{request}").and_then(|()| stream.read_to_string(&mut wire)) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("toa-lb took the request but did not answer within {} s", timeout.as_secs_f32()),
            ));
        }
        Err(e) => return Err(e),
    }
    Reply::from_wire(&wire).ok_or_else(|| std::io::Error::other(format!("malformed reply {wire:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_does_not_answer_times_out() {
        let path = std::env::temp_dir().join(format!("toa-lb-ctl-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Takes the connection (the backlog does) and never answers.
        let started = std::time::Instant::now();
        let err = request_within(&path, &Request::Stats, std::time::Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("did not answer within 0.2 s"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn requests_parse_and_print_back() {
        let vip: SocketAddr = "203.0.113.10:80".parse().unwrap();
        let be: SocketAddr = "100.125.2.1:8080".parse().unwrap();
        let cases = [
            ("listeners", Request::Listeners),
            ("  stats ", Request::Stats),
            ("reload", Request::Reload),
            (
                "set 203.0.113.10:80 obtain-client-ip off",
                Request::Set { listener: ListenerRef::Key((Protocol::Tcp, vip)), mode: ModeRequest::Off },
            ),
            (
                "set udp/[2001:db8::1]:53 obtain-client-ip transparent",
                Request::Set {
                    listener: ListenerRef::Key((Protocol::Udp, "[2001:db8::1]:53".parse().unwrap())),
                    mode: ModeRequest::Transparent,
                },
            ),
            (
                "add-backend 0 100.125.2.1:8080",
                Request::AddBackend { listener: ListenerRef::Index(0), addr: be, weight: 1 },
            ),
            (
                "add-backend tcp/203.0.113.10:80 100.125.2.1:8080 3",
                Request::AddBackend { listener: ListenerRef::Key((Protocol::Tcp, vip)), addr: be, weight: 3 },
            ),
            (
                "undrain 1 100.125.2.1:8080",
                Request::Drain { listener: ListenerRef::Index(1), addr: be, drain: false },
            ),
            (
                "remove-backend 2 100.125.2.1:8080",
                Request::RemoveBackend { listener: ListenerRef::Index(2), addr: be },
            ),
        ];
        for (text, request) in cases {
            assert_eq!(text.parse::<Request>(), Ok(request), "{text}");
            assert_eq!(request.to_string().parse::<Request>(), Ok(request), "{request}");
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Request>().unwrap_err();
        assert!(matches!(err("frobnicate"), RequestError::Unknown(_)));
        assert!(err("frobnicate").to_string().contains("listeners | backends"));
        assert_eq!(err("set 0 obtain-client-ip maybe"), RequestError::Mode("maybe".into()));
        assert_eq!(err("drain sctp/1.2.3.4:5 1.2.3.4:5"), RequestError::Listener("sctp/1.2.3.4:5".into()));
        assert_eq!(err("drain 0 nowhere"), RequestError::Address("nowhere".into()));
        assert_eq!(err("add-backend 0 1.2.3.4:5 heavy"), RequestError::Weight("heavy".into()));
        assert!(matches!(err("add-backend 0"), RequestError::Unknown(_)));
    }

    #[test]
    fn replies_round_trip() {
        for reply in
            [Reply::Ok("a\nb\n".into()), Reply::Ok(String::new()), Reply::Error("no listener 9".into())]
        {
            assert_eq!(Reply::from_wire(&reply.to_wire()), Some(reply));
        }
        assert_eq!(Reply::from_wire("garbage"), None);
    }
}
