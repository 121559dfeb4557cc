//! The counters, defined once: one table gives the struct fields, the
//! `toa-lb ctl stats` names and the Prometheus series.

use std::net::SocketAddr;

use crate::engine::config::Protocol;

/// One counter of [`Counters`] or [`BackendCounters`], as the control plane
/// shows it.
#[derive(Clone, Copy, Debug)]
pub struct CounterDef<C: 'static> {
    /// The name in `toa-lb ctl stats` (the struct field's).
    pub name: &'static str,
    /// The Prometheus series.
    pub metric: &'static str,
    /// A `reason` label value, when several counters share one series.
    pub reason: Option<&'static str>,
    /// The series' help text.
    pub help: &'static str,
    /// Reads it.
    pub get: fn(&C) -> u64,
}

macro_rules! counters {
    (
        $(#[$meta:meta])* $vis:vis struct $name:ident {
            $( $(#[doc = $doc:literal])+ $field:ident => $metric:literal $(reason $reason:literal)? , $help:literal; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        $vis struct $name {
            $( $(#[doc = $doc])+ pub $field: u64, )*
        }

        impl $name {
            /// Every counter, in the order `ctl stats` and the metrics show them.
            pub const TABLE: &'static [CounterDef<$name>] = &[
                $( CounterDef {
                    name: stringify!($field),
                    metric: $metric,
                    reason: counters!(@reason $($reason)?),
                    help: $help,
                    get: |c: &$name| c.$field,
                }, )*
            ];
        }

        impl std::ops::AddAssign<&$name> for $name {
            /// Field by field: the sum over several engines (one per datapath worker).
            fn add_assign(&mut self, other: &$name) {
                $( self.$field += other.$field; )*
            }
        }
    };
    (@reason) => { None };
    (@reason $reason:literal) => { Some($reason) };
}

counters! {
    /// Counters of one listener.
    pub struct Counters {
        /// Flows created.
        flows => "toa_lb_flows_created_total", "Flows created.";
        /// Flows evicted to make room under a SYN flood.
        evicted => "toa_lb_flows_evicted_total", "Half-open flows evicted under a SYN flood.";
        /// Flows that timed out (the kernel datapath: flows that ended).
        expired => "toa_lb_flows_expired_total", "Flows that timed out or ended.";
        /// TOA options written.
        injected => "toa_lb_toa_injected_total", "TOA options written.";
        /// Segments that should have carried a TOA but had no room for it.
        no_room => "toa_lb_toa_no_room_total", "Segments with no room for the TOA.";
        /// TOA-format options removed from what clients sent.
        stripped => "toa_lb_toa_stripped_total", "TOA options removed from what clients sent.";
        /// UOAs written into client datagrams.
        uoa_injected => "toa_lb_uoa_injected_total", "UOAs written into client datagrams.";
        /// Datagrams that should have carried a UOA but had no room for it
        /// (the MTU, or full IPv4 options): a carrier went ahead of each.
        uoa_no_room => "toa_lb_uoa_no_room_total", "Datagrams with no room for the UOA (a carrier went ahead).";
        /// Empty datagrams sent only to carry a UOA, ahead of a datagram without room.
        uoa_carriers => "toa_lb_uoa_carriers_total", "Empty datagrams sent only to carry a UOA.";
        /// UOAs removed from what clients sent.
        uoa_stripped => "toa_lb_uoa_stripped_total", "UOAs removed from what clients sent.";
        /// SYN-ACKs whose MSS was lowered.
        mss_clamped => "toa_lb_mss_clamped_total", "SYN-ACKs whose MSS was lowered.";
        /// Client segments whose options overran the header, passed with an
        /// EOL at the fault (the kernel datapath; the engine drops them).
        options_malformed => "toa_lb_options_malformed_total", "Client segments with malformed options, cut at the fault.";
        /// Packets forwarded to backends.
        to_backend => "toa_lb_packets_to_backend_total", "Packets forwarded to backends.";
        /// Packets forwarded to clients.
        to_client => "toa_lb_packets_to_client_total", "Packets forwarded to clients.";
        /// IP bytes forwarded to backends (as sent, TOAs included).
        bytes_to_backend => "toa_lb_bytes_to_backend_total", "IP bytes forwarded to backends.";
        /// IP bytes forwarded to clients.
        bytes_to_client => "toa_lb_bytes_to_client_total", "IP bytes forwarded to clients.";
        /// Backends that went down or came back (health checks).
        health_changes => "toa_lb_health_changes_total", "Backends that went down or came back.";
        /// Drops: malformed packets (the kernel datapath: client segments whose options overran the header).
        dropped_malformed => "toa_lb_dropped_total" reason "malformed", "Packets dropped, by reason.";
        /// Drops: client segments without a flow.
        dropped_no_flow => "toa_lb_dropped_total" reason "no_flow", "Packets dropped, by reason.";
        /// Drops: the flow table is full.
        dropped_table_full => "toa_lb_dropped_total" reason "table_full", "Packets dropped, by reason.";
        /// Drops: no SNAT address and port free.
        dropped_no_snat => "toa_lb_dropped_total" reason "no_snat_port", "Packets dropped, by reason.";
        /// Drops: every backend is down or draining.
        dropped_no_backend => "toa_lb_dropped_total" reason "no_backend", "Packets dropped, by reason.";
        /// Drops: a new flow's first packet on a datapath worker its client port
        /// does not steer to (user-space datapaths with several workers).
        dropped_wrong_engine => "toa_lb_dropped_total" reason "wrong_engine", "Packets dropped, by reason.";
        /// Drops: TCP segments the kernel datapath's injector cannot read into
        /// (IPv4 fragments, IPv6 extension headers; options it could not read
        /// or rewrite), where a client's TOA could not be stripped. (The
        /// user-space datapaths do not forward fragments.)
        dropped_unreadable => "toa_lb_dropped_total" reason "unreadable", "Packets dropped, by reason.";
    }
}

counters! {
    /// Traffic of one backend of one listener, since the start (kept after
    /// the backend is removed, while its flows go on).
    pub struct BackendCounters {
        /// Flows given to it.
        flows => "toa_lb_backend_flows_total", "Flows given to the backend.";
        /// Packets sent to it.
        to_backend => "toa_lb_backend_packets_to_backend_total", "Packets sent to the backend.";
        /// Packets from it, sent on to clients.
        to_client => "toa_lb_backend_packets_to_client_total", "Packets from the backend.";
        /// IP bytes sent to it.
        bytes_to_backend => "toa_lb_backend_bytes_to_backend_total", "IP bytes sent to the backend.";
        /// IP bytes from it.
        bytes_to_client => "toa_lb_backend_bytes_to_client_total", "IP bytes from the backend.";
    }
}

/// A listener's identity across reloads: protocol and VIP.
pub type ListenerKey = (Protocol, SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_every_field() {
        // Each field a different value: a table row reading the wrong field shows.
        let c = Counters {
            flows: 1,
            evicted: 2,
            expired: 3,
            injected: 4,
            no_room: 5,
            stripped: 6,
            uoa_injected: 7,
            uoa_no_room: 8,
            uoa_carriers: 9,
            uoa_stripped: 10,
            mss_clamped: 11,
            options_malformed: 12,
            to_backend: 13,
            to_client: 14,
            bytes_to_backend: 15,
            bytes_to_client: 16,
            health_changes: 17,
            dropped_malformed: 18,
            dropped_no_flow: 19,
            dropped_table_full: 20,
            dropped_no_snat: 21,
            dropped_no_backend: 22,
            dropped_wrong_engine: 23,
            dropped_unreadable: 24,
        };
        let values: Vec<u64> = Counters::TABLE.iter().map(|d| (d.get)(&c)).collect();
        assert_eq!(values, (1..=24).collect::<Vec<u64>>());
        let names: Vec<&str> = Counters::TABLE.iter().map(|d| d.name).collect();
        assert!(names.contains(&"mss_clamped") && names.contains(&"health_changes"));
        let mut sum = c;
        sum += &c;
        assert_eq!((Counters::TABLE[17].get)(&sum), 36);
        assert_eq!(Counters::TABLE[19].reason, Some("table_full"));
    }
}
