//! Running `nft`: scripts in one transaction, tables, named counters.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// What went wrong running `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// It could not be started.
    #[error("cannot run nft ({0}): install nftables (apt-get install nftables)")]
    Spawn(std::io::Error),
    /// It refused what it was given.
    #[error("nft: {0}")]
    Failed(String),
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(script.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Failed(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Runs `script` (`nft -f -`): all of it, or nothing.
pub(crate) fn apply(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(script)).map(drop)
}

/// Deletes a table and everything in it; an absent table is fine.
pub(crate) fn delete_table(family: &str, table: &str) -> Result<(), NftError> {
    match run(&["delete", "table", family, table], None) {
        Err(NftError::Failed(e)) if e.contains("No such file") => Ok(()),
        other => other.map(drop),
    }
}

/// Whether a table exists.
pub(crate) fn table_exists(family: &str, table: &str) -> bool {
    run(&["list", "table", family, table], None).is_ok()
}

/// The named counters of a table: name -> (packets, bytes).
pub(crate) fn counters(family: &str, table: &str) -> Result<HashMap<String, (u64, u64)>, NftError> {
    let json = run(&["-j", "list", "counters", "table", family, table], None)?;
    Ok(parse_counters(&json))
}

/// Reads the counters out of `nft -j list counters`: `{"nftables": [..,
/// {"counter": {"name": N, "packets": P, "bytes": B, ..}}, ..]}`.
fn parse_counters(json: &str) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else { return out };
    let Some(items) = value.get("nftables").and_then(|v| v.as_array()) else { return out };
    for item in items {
        let Some(counter) = item.get("counter") else { continue };
        let (Some(name), Some(packets), Some(bytes)) = (
            counter.get("name").and_then(|v| v.as_str()),
            counter.get("packets").and_then(|v| v.as_u64()),
            counter.get("bytes").and_then(|v| v.as_u64()),
        ) else {
            continue;
        };
        out.insert(name.to_owned(), (packets, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "b1_o", "table": "toa_lb", "handle": 3, "packets": 12, "bytes": 648}},
            {"counter": {"family": "inet", "name": "table_full", "table": "toa_lb", "handle": 4, "packets": 0, "bytes": 0}}]}"#;
        let c = parse_counters(json);
        assert_eq!(c.get("b1_o"), Some(&(12, 648)));
        assert_eq!(c.get("table_full"), Some(&(0, 0)));
        assert!(parse_counters("not json").is_empty());
    }
}
