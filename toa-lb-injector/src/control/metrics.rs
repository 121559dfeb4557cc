//! The Prometheus text format of a [`Snapshot`], and a tiny HTTP server for
//! it on a loopback address (`GET /metrics`).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;

use crate::control::Stop;
use crate::datapath::{Balancer, Snapshot};
use crate::engine::config::ListenerConfig;
use crate::engine::counters::CounterDef;
use crate::engine::{BackendCounters, Counters};

/// Every series `toa-lb` exports (the dashboard test checks its queries against it).
pub fn series() -> Vec<&'static str> {
    let mut all = vec!["toa_lb_flows", "toa_lb_listener_flows", "toa_lb_backend_up"];
    all.extend(Counters::TABLE.iter().map(|d| d.metric));
    all.extend(BackendCounters::TABLE.iter().map(|d| d.metric));
    all.extend(["toa_lb_datapath_dropped_total", "toa_lb_unparsed_total", "toa_lb_put_back_total"]);
    all.dedup();
    all
}

/// Writes `# HELP` and `# TYPE` once per series.
fn header(out: &mut String, seen: &mut Vec<&'static str>, name: &'static str, help: &str, kind: &str) {
    if !seen.contains(&name) {
        seen.push(name);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// The counters in the Prometheus text format.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut seen = Vec::new();
    header(&mut out, &mut seen, "toa_lb_flows", "Flows now.", "gauge");
    let _ = writeln!(out, "toa_lb_flows {}", snapshot.flows);
    if snapshot.listeners.iter().any(|l| l.flows.is_some()) {
        header(&mut out, &mut seen, "toa_lb_listener_flows", "Flows now, per listener.", "gauge");
        for l in &snapshot.listeners {
            if let Some(n) = l.flows {
                let _ = writeln!(out, "toa_lb_listener_flows{{{}}} {n}", labels(&l.config));
            }
        }
    }
    for def in Counters::TABLE {
        header(&mut out, &mut seen, def.metric, def.help, "counter");
        for l in &snapshot.listeners {
            let _ = writeln!(
                out,
                "{}{{{}{}}} {}",
                def.metric,
                labels(&l.config),
                reason(def),
                (def.get)(&l.counters)
            );
        }
    }
    header(&mut out, &mut seen, "toa_lb_backend_up", "Whether health checks say the backend is up.", "gauge");
    for l in &snapshot.listeners {
        for b in &l.backends {
            let _ = writeln!(
                out,
                "toa_lb_backend_up{{{},backend=\"{}\"}} {}",
                labels(&l.config),
                b.backend.addr,
                u8::from(b.up)
            );
        }
    }
    for def in BackendCounters::TABLE {
        header(&mut out, &mut seen, def.metric, def.help, "counter");
        for (((protocol, vip), backend), c) in &snapshot.backends {
            let _ = writeln!(
                out,
                "{}{{listener=\"{vip}\",protocol=\"{protocol}\",backend=\"{backend}\"}} {}",
                def.metric,
                (def.get)(c)
            );
        }
    }
    header(
        &mut out,
        &mut seen,
        "toa_lb_datapath_dropped_total",
        "Frames the datapath dropped, by reason.",
        "counter",
    );
    for (reason, n) in &snapshot.datapath_drops {
        let _ = writeln!(out, "toa_lb_datapath_dropped_total{{reason=\"{reason}\"}} {n}");
    }
    header(&mut out, &mut seen, "toa_lb_unparsed_total", "Packets that were not valid IP.", "counter");
    let _ = writeln!(out, "toa_lb_unparsed_total {}", snapshot.unparsed);
    header(
        &mut out,
        &mut seen,
        "toa_lb_put_back_total",
        "What someone else removed (nftables table, addresses, forwarding, the injector's programs) and toa-lb put back.",
        "counter",
    );
    for (what, n) in &snapshot.put_back {
        let _ = writeln!(out, "toa_lb_put_back_total{{what=\"{what}\"}} {n}");
    }
    out
}

fn reason<C>(def: &CounterDef<C>) -> String {
    def.reason.map(|r| format!(",reason=\"{r}\"")).unwrap_or_default()
}

/// The labels naming a listener.
fn labels(l: &ListenerConfig) -> String {
    format!("listener=\"{}\",protocol=\"{}\"", l.vip, l.protocol)
}

/// Serves `GET /metrics` on `addr` until `stop` is set.
pub fn serve(addr: std::net::SocketAddr, balancer: Arc<dyn Balancer>, stop: Stop) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        stop.accept_loop(&listener, std::net::TcpListener::accept, |(stream, _)| {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut request = String::new();
            let _ = BufReader::new(&stream).read_line(&mut request);
            let mut stream = stream;
            let (status, body) = if request.starts_with("GET /metrics ") {
                ("200 OK", render(&balancer.snapshot()))
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{BackendView, ListenerView};
    use crate::engine::config::{Backend, ObtainClientIp, Placement, Protocol, Scheduler};

    #[test]
    fn every_series_has_help_and_type_once() {
        let config = ListenerConfig {
            vip: "203.0.113.10:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![Backend { addr: "100.125.2.1:80".parse().unwrap(), weight: 1 }],
            scheduler: Scheduler::RoundRobin,
            obtain_client_ip: ObtainClientIp::Off,
            placement: Placement::default(),
            mss_clamp: Default::default(),
        };
        let counters = Counters { mss_clamped: 7, dropped_table_full: 3, ..Counters::default() };
        let snapshot = Snapshot {
            listeners: vec![ListenerView {
                backends: vec![BackendView { backend: config.backends[0], up: false, draining: false }],
                config,
                counters,
                flows: Some(4),
            }],
            datapath_drops: vec![("truncated", 2)],
            put_back: vec![("table", 1), ("address", 0)],
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        for name in series() {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}: {text}");
        }
        let labels = "listener=\"203.0.113.10:80\",protocol=\"tcp\"";
        assert!(text.contains(&format!("toa_lb_mss_clamped_total{{{labels}}} 7")), "{text}");
        assert!(
            text.contains(&format!("toa_lb_dropped_total{{{labels},reason=\"table_full\"}} 3")),
            "{text}"
        );
        assert!(text.contains(&format!("toa_lb_listener_flows{{{labels}}} 4")), "{text}");
        assert!(text.contains(
            "toa_lb_backend_up{listener=\"203.0.113.10:80\",protocol=\"tcp\",backend=\"100.125.2.1:80\"} 0"
        ));
        assert!(text.contains("toa_lb_datapath_dropped_total{reason=\"truncated\"} 2"));
        assert!(text.contains(
            "toa_lb_put_back_total{what=\"table\"} 1\ntoa_lb_put_back_total{what=\"address\"} 0\n"
        ));
    }
}
