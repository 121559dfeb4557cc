//! What the dashboard and alert-rule tests share: the series the project
//! exports, and the ones a PromQL expression names.

use std::collections::BTreeSet;

/// Every series `toa-lb` and `toa-shim ebpf metrics` serve.
pub(crate) fn exported() -> BTreeSet<&'static str> {
    toa_lb_injector::control::metrics::series()
        .into_iter()
        .chain(toa_server_shim::ebpf::metric_series())
        .collect()
}

/// The series names in a PromQL expression: identifiers of ours (`toa_...`).
pub(crate) fn series_in(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("toa_"))
        .collect()
}
