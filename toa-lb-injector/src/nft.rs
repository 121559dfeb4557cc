//! Running `nft`: scripts in one transaction, tables, named counters; and
//! asking nf_tables over netlink whether a table exists.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use nix::sys::socket::{self, MsgFlags, NetlinkAddr};

use crate::nfnetlink;

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

/// `NFPROTO_*` of an nft family name.
fn family_number(family: &str) -> Option<u8> {
    Some(match family {
        "inet" => 1,
        "ip" => 2,
        "arp" => 3,
        "netdev" => 5,
        "bridge" => 7,
        "ip6" => 10,
        _ => return None,
    })
}

/// The request: `NFT_MSG_GETTABLE` of `table` in `family`, with an ack.
fn get_table_request(family: u8, table: &str) -> Vec<u8> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFTA_TABLE_NAME: u16 = 1;
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
    let mut msg = nfnetlink::request(kind, nfnetlink::NLM_F_REQUEST | nfnetlink::NLM_F_ACK, 1, family);
    // NUL-terminated.
    nfnetlink::attribute(&mut msg, NFTA_TABLE_NAME, &[table.as_bytes(), &[0]].concat());
    nfnetlink::finish(msg)
}

/// The answer to [`get_table_request`]: `Some(true)` at the ack (the table
/// came before it), `Some(false)` at `ENOENT`, `None` if the datagram ends
/// before either; other errors, and malformed messages, are errors.
fn table_answer(datagram: &[u8]) -> std::io::Result<Option<bool>> {
    let malformed = || std::io::Error::other("malformed nf_tables netlink message");
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let len = nfnetlink::u32_at(datagram, at).ok_or_else(malformed)? as usize;
        let kind = nfnetlink::u16_at(datagram, at + 4).ok_or_else(malformed)?;
        if len < 16 || at + len > datagram.len() {
            return Err(malformed());
        }
        if kind == nfnetlink::NLMSG_ERROR {
            let errno = nfnetlink::u32_at(datagram, at + 16).ok_or_else(malformed)? as i32;
            return match -errno {
                0 => Ok(Some(true)),
                libc::ENOENT => Ok(Some(false)),
                e => Err(std::io::Error::from_raw_os_error(e)),
            };
        }
        at += len.next_multiple_of(4);
    }
    Ok(None)
}

/// Whether a table exists: one netlink request (no `nft` process), so that
/// it can be asked often (the daemons look for their tables being flushed
/// away by someone else's `nft flush ruleset`).
pub(crate) fn table_exists(family: &str, table: &str) -> std::io::Result<bool> {
    let number = family_number(family)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("family {family}")))?;
    let fd = nfnetlink::socket()?;
    socket::sendto(
        fd.as_raw_fd(),
        &get_table_request(number, table),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(std::io::Error::other("nf_tables netlink closed without an answer"));
        }
        if let Some(exists) = table_answer(&buf[..n])? {
            return Ok(exists);
        }
    }
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
    use crate::nfnetlink::message;

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

    #[test]
    fn get_table_request_and_its_answers() {
        let req = get_table_request(1, "toa_lb");
        assert_eq!(req.len(), 16 + 4 + 12, "header, nfgenmsg, name attribute padded");
        assert_eq!(u32::from_ne_bytes(req[..4].try_into().unwrap()) as usize, req.len());
        assert_eq!(u16::from_ne_bytes(req[4..6].try_into().unwrap()), 10 << 8 | 1);
        assert_eq!(&req[20..22], &11u16.to_ne_bytes(), "4 + 6 bytes + NUL");
        assert_eq!(&req[24..31], b"toa_lb\0");
        let error = |errno: i32| message(2, &[errno.to_ne_bytes().as_slice(), &[0; 16]].concat());
        let table = message(10 << 8, &[1, 0, 0, 0]);
        assert_eq!(table_answer(&[table.clone(), error(0)].concat()).unwrap(), Some(true));
        assert_eq!(table_answer(&error(-libc::ENOENT)).unwrap(), Some(false));
        assert_eq!(table_answer(&table).unwrap(), None, "the ack is still to come");
        assert!(table_answer(&error(-libc::EPERM)).is_err());
        assert!(
            table_answer(&[8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "length below a header"
        );
        assert_eq!(table_answer(&[1, 2, 3]).unwrap(), None, "too short to be a message");
    }

    #[test]
    fn table_exists_asks_the_kernel() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (nf_tables over netlink in a new network namespace)");
            return;
        }
        // In a namespace of its own: no other table is touched.
        let answers = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let before = table_exists("inet", "toa_lb_probe").unwrap();
            apply("add table inet toa_lb_probe").unwrap();
            let after = table_exists("inet", "toa_lb_probe").unwrap();
            let other_family = table_exists("netdev", "toa_lb_probe").unwrap();
            (before, after, other_family, table_exists("no-such-family", "x").is_err())
        })
        .join()
        .unwrap();
        assert_eq!(answers, (false, true, false, true));
    }
}
