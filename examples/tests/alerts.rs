//! `deploy/prometheus/toa-alerts.yml` against what the project exports: the
//! shape of a Prometheus rule file, every rule's parts, every expression
//! naming only series that `toa-lb` or `toa-shim ebpf metrics` serve, and
//! the alerts an operator needs. (No Prometheus runs here, and no promtool:
//! this checks the file's shape and names, not PromQL's grammar.)

use std::collections::BTreeSet;

use yaml_rust2::{Yaml, YamlLoader};

mod series;

fn rules() -> Vec<Yaml> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/toa-alerts.yml");
    let text = std::fs::read_to_string(path).expect("deploy/prometheus/toa-alerts.yml");
    let mut docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    assert_eq!(docs.len(), 1, "one document");
    let doc = docs.remove(0);
    let groups = doc["groups"].as_vec().expect("groups");
    assert!(!groups.is_empty());
    let mut all = Vec::new();
    for group in groups {
        assert!(group["name"].as_str().is_some_and(|n| !n.is_empty()), "a group has a name");
        all.extend(group["rules"].as_vec().expect("a group has rules").iter().cloned());
    }
    all
}

#[test]
fn every_alert_is_whole_and_names_exported_series() {
    let exported = series::exported();
    let rules = rules();
    let mut names = BTreeSet::new();
    let mut used = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().expect("every rule is an alert with a name");
        assert!(names.insert(name), "{name}: two alerts of that name");
        let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
        // Balanced brackets: the most common slip in a hand-written expression.
        for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
            assert_eq!(
                expr.matches(open).count(),
                expr.matches(close).count(),
                "{name}: {open}{close} in {expr}"
            );
        }
        let series = series::series_in(expr);
        assert!(!series.is_empty(), "{name}: {expr} names none of our series");
        for s in series {
            assert!(exported.contains(s), "{name}: {s} is not exported (in {expr})");
            used.insert(s);
        }
        if let Some(duration) = rule["for"].as_str() {
            assert!(
                duration.ends_with('m') || duration.ends_with('s') || duration.ends_with('h'),
                "{name}: for {duration}"
            );
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_else(|| panic!("{name}: no severity"));
        assert!(["critical", "warning", "info"].contains(&severity), "{name}: severity {severity}");
        for annotation in ["summary", "description"] {
            assert!(
                rule["annotations"][annotation].as_str().is_some_and(|t| !t.is_empty()),
                "{name}: no {annotation}"
            );
        }
    }
    // What an operator must hear about.
    for needed in [
        "toa_lb_backend_up",
        "toa_lb_dropped_total",
        "toa_lb_toa_no_room_total",
        "toa_lb_put_back_total",
        "toa_shim_ebpf_attached",
        "toa_shim_ebpf_udp_flows_max",
    ] {
        assert!(used.contains(needed), "no alert on {needed}");
    }
}
