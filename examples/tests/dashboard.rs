//! `deploy/grafana/toa.json` against what the project exports: every query
//! names only series that `toa-lb` or `toa-shim ebpf metrics` serve, and the
//! panels an operator needs are there. (No Grafana runs here: this checks
//! the JSON's shape and its queries, not how Grafana draws them.)

use std::collections::BTreeSet;

use serde_json::Value;

mod series;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/toa.json");
    let text = std::fs::read_to_string(path).expect("deploy/grafana/toa.json");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every `expr` of every target, with its panel's title.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((title.clone(), target["expr"].as_str().expect("a target has an expr").to_owned()));
        }
    }
    out
}

#[test]
fn every_query_names_an_exported_series() {
    let exported = series::exported();
    let queries = queries(&dashboard());
    assert!(!queries.is_empty());
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = series::series_in(expr);
        assert!(!names.is_empty(), "panel {title:?}: {expr} names none of our series");
        for name in names {
            assert!(exported.contains(name), "panel {title:?}: {name} is not exported (in {expr})");
            used.insert(name);
        }
    }
    // What an operator needs to see.
    for needed in [
        "toa_lb_flows_created_total",
        "toa_lb_listener_flows",
        "toa_lb_toa_injected_total",
        "toa_lb_toa_no_room_total",
        "toa_lb_toa_stripped_total",
        "toa_lb_dropped_total",
        "toa_lb_backend_up",
        "toa_lb_put_back_total",
        "toa_shim_ebpf_attached",
        "toa_shim_ebpf_found_total",
        "toa_shim_ebpf_untrusted_total",
        "toa_shim_ebpf_malformed_total",
        "toa_shim_ebpf_rewritten_total",
        "toa_lb_uoa_injected_total",
        "toa_lb_uoa_carriers_total",
        "toa_shim_ebpf_udp_found_total",
        "toa_shim_ebpf_udp_untrusted_total",
        "toa_shim_ebpf_udp_received_total",
        "toa_shim_ebpf_udp_flows",
        "toa_shim_ebpf_udp_flows_max",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn the_dashboard_has_a_sane_shape() {
    let dashboard = dashboard();
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40));
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels {
        let grid = &panel["gridPos"];
        for key in ["x", "y", "w", "h"] {
            assert!(grid[key].as_u64().is_some(), "panel {} lacks gridPos.{key}", panel["title"]);
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "panel {} too wide",
            panel["title"]
        );
        if panel["type"] != "row" {
            // The data source is the dashboard's variable, so that it imports anywhere.
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {}", panel["title"]);
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains(&"datasource") && variables.contains(&"instance"));
}
