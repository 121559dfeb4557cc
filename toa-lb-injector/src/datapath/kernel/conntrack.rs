//! Reading the kernel's connection tracking: `toa-lb`'s flows by conntrack
//! mark (a ctnetlink dump that the kernel filters by mark), the table's total
//! size, and its drop statistics.
//!
//! Why not `ct count` in the ruleset for `max_flows`: the kernel's connlimit
//! walks its whole list of connections on each new one. Measured on the
//! testbed with 19,000 established flows in the list: 13,000 new
//! connections per second without the rule, 3,000 with it.

use std::collections::HashMap;
use std::io;

use std::os::fd::AsRawFd;

use nix::sys::socket::{self, MsgFlags, NetlinkAddr};

use crate::nfnetlink::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, u16_at, u32_at};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;
/// `IPS_ASSURED`: the flow has seen traffic both ways (a handshake completed).
const IPS_ASSURED: u32 = 1 << 2;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The request: dump every conntrack entry whose mark & `mask` == `value`.
fn dump_request(value: u32, mask: u32, seq: u32) -> Vec<u8> {
    let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
    // Every family.
    let mut msg = nfnetlink::request(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, libc::AF_UNSPEC as u8);
    for (kind, v) in [(CTA_MARK, value), (CTA_MARK_MASK, mask)] {
        nfnetlink::attribute(&mut msg, kind, &v.to_be_bytes());
    }
    nfnetlink::finish(msg)
}

/// What one received datagram held.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// More entries follow.
    More,
    /// The dump is complete.
    Done,
}

/// One conntrack entry of a dump: enough to count it, judge it and delete it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its address family (the dump message's).
    family: u8,
    /// Its mark.
    pub mark: u32,
    /// Whether it has seen traffic both ways (not half-open).
    pub assured: bool,
    /// Seconds until it times out.
    pub timeout: u32,
    /// Its original tuple, the attribute as the kernel sent it.
    tuple: Vec<u8>,
    /// Its zone attribute, when it has one.
    zone: Option<Vec<u8>>,
}

/// Reads the entries of one datagram into `entries`.
fn parse(datagram: &[u8], entries: &mut Vec<Entry>) -> io::Result<Batch> {
    let malformed = || io::Error::other("malformed ctnetlink message");
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let len = u32_at(datagram, at).ok_or_else(malformed)? as usize;
        let kind = u16_at(datagram, at + 4).ok_or_else(malformed)?;
        if len < 16 || at + len > datagram.len() {
            return Err(malformed());
        }
        let msg = &datagram[at..at + len];
        match kind {
            NLMSG_DONE => return Ok(Batch::Done),
            NLMSG_ERROR => {
                let errno = u32_at(msg, 16).ok_or_else(malformed)? as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ => {
                // nlmsghdr (16), nfgenmsg (4), then attributes.
                let family = *msg.get(16).ok_or_else(malformed)?;
                let mut entry =
                    Entry { family, mark: 0, assured: false, timeout: 0, tuple: Vec::new(), zone: None };
                let mut a = 20;
                while a + 4 <= msg.len() {
                    let alen = u16_at(msg, a).ok_or_else(malformed)? as usize;
                    let atype = u16_at(msg, a + 2).ok_or_else(malformed)? & NLA_TYPE_MASK;
                    if alen < 4 || a + alen > msg.len() {
                        return Err(malformed());
                    }
                    let be32 = || -> io::Result<u32> {
                        Ok(u32::from_be_bytes(
                            msg.get(a + 4..a + 8)
                                .ok_or_else(malformed)?
                                .try_into()
                                .map_err(|_| malformed())?,
                        ))
                    };
                    match atype {
                        CTA_MARK => entry.mark = be32()?,
                        CTA_STATUS => entry.assured = be32()? & IPS_ASSURED != 0,
                        CTA_TIMEOUT => entry.timeout = be32()?,
                        CTA_TUPLE_ORIG => entry.tuple = msg[a..a + alen].to_vec(),
                        CTA_ZONE => entry.zone = Some(msg[a..a + alen].to_vec()),
                        _ => {}
                    }
                    a += alen.next_multiple_of(4);
                }
                entries.push(entry);
            }
        }
        at += len.next_multiple_of(4);
    }
    Ok(Batch::More)
}

/// The conntrack entries of this network namespace whose mark & `mask` == `value`.
pub fn dump(value: u32, mask: u32) -> io::Result<Vec<Entry>> {
    let fd = nfnetlink::socket()?;
    socket::sendto(
        fd.as_raw_fd(),
        &dump_request(value, mask, 1),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 || parse(&buf[..n], &mut entries)? == Batch::Done {
            return Ok(entries);
        }
    }
}

/// The entries of [`dump`], counted by mark.
pub fn count_by_mark(value: u32, mask: u32) -> io::Result<HashMap<u32, usize>> {
    let mut counts = HashMap::new();
    for entry in dump(value, mask)? {
        *counts.entry(entry.mark).or_default() += 1;
    }
    Ok(counts)
}

/// A delete request for one entry, by its original tuple (and zone).
fn delete_request(entry: &Entry, seq: u32) -> Vec<u8> {
    let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;
    let mut msg = nfnetlink::request(kind, NLM_F_REQUEST | NLM_F_ACK, seq, entry.family);
    // The attributes as the dump gave them, headers included.
    for attr in std::iter::once(&entry.tuple).chain(entry.zone.as_ref()) {
        msg.extend_from_slice(attr);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }
    nfnetlink::finish(msg)
}

/// Deletes `entries` from the connection tracker (their packets then start
/// new flows). Returns how many went; one already gone is not an error.
pub fn delete(entries: &[Entry]) -> io::Result<usize> {
    let fd = nfnetlink::socket()?;
    let mut deleted = 0;
    let mut buf = vec![0u8; 1 << 16];
    for chunk in entries.chunks(64) {
        let batch: Vec<u8> =
            chunk.iter().enumerate().flat_map(|(i, e)| delete_request(e, i as u32 + 1)).collect();
        socket::sendto(fd.as_raw_fd(), &batch, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        let mut acks = 0;
        while acks < chunk.len() {
            let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 20 <= n {
                let len = u32_at(&buf, at).unwrap_or(0) as usize;
                if len < 16 || at + len > n {
                    break;
                }
                if u16_at(&buf, at + 4) == Some(NLMSG_ERROR) {
                    acks += 1;
                    if u32_at(&buf, at + 16) == Some(0) {
                        deleted += 1;
                    }
                }
                at += len.next_multiple_of(4);
            }
            if n == 0 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// All conntrack entries of this network namespace (cheap: one file).
pub fn total() -> io::Result<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")?;
    text.trim().parse().map_err(|_| io::Error::other("nf_conntrack_count is not a number"))
}

/// The table's bound (`net.netfilter.nf_conntrack_max`).
pub fn max() -> io::Result<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")?;
    text.trim().parse().map_err(|_| io::Error::other("nf_conntrack_max is not a number"))
}

/// The connection tracker's own drops, summed over CPUs
/// (`/proc/net/stat/nf_conntrack`): drop, early_drop, insert_failed.
pub fn drops() -> Vec<(&'static str, u64)> {
    let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").unwrap_or_default();
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Vec<(&'static str, u64)> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let wanted = [
        ("drop", "conntrack_drop"),
        ("early_drop", "conntrack_early_drop"),
        ("insert_failed", "conntrack_insert_failed"),
    ];
    let columns: Vec<Option<usize>> =
        wanted.iter().map(|(c, _)| header.iter().position(|h| h == c)).collect();
    let mut sums = [0u64; 3];
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        for (sum, column) in sums.iter_mut().zip(&columns) {
            if let Some(v) = column.and_then(|c| fields.get(c)).and_then(|f| u64::from_str_radix(f, 16).ok())
            {
                *sum += v;
            }
        }
    }
    wanted.iter().zip(sums).map(|((_, name), n)| (*name, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnetlink::message;

    fn entry(mark: u32) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0]; // nfgenmsg
        // A nested tuple attribute first (flags on the type), then status, timeout, mark.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&(CTA_TUPLE_ORIG | 0x8000).to_ne_bytes());
        body.extend_from_slice(&[1, 2, 3, 4]);
        for (kind, value) in [(CTA_STATUS, IPS_ASSURED | 8), (CTA_TIMEOUT, 30)] {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(&value.to_be_bytes());
        }
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&CTA_MARK.to_ne_bytes());
        body.extend_from_slice(&mark.to_be_bytes());
        message(NFNL_SUBSYS_CTNETLINK << 8, &body)
    }

    #[test]
    fn reads_entries_until_done() {
        let mut datagram = entry(0x7a00_0001);
        datagram.extend(entry(0x7a00_0002));
        datagram.extend(entry(0x7a00_0001));
        let mut entries = Vec::new();
        assert_eq!(parse(&datagram, &mut entries).unwrap(), Batch::More);
        let done = message(NLMSG_DONE, &[0; 4]);
        assert_eq!(parse(&done, &mut entries).unwrap(), Batch::Done);
        let marks: Vec<u32> = entries.iter().map(|e| e.mark).collect();
        assert_eq!(marks, [0x7a00_0001, 0x7a00_0002, 0x7a00_0001]);
        let e = &entries[0];
        assert_eq!((e.family, e.assured, e.timeout), (2, true, 30));
        assert_eq!(e.tuple.len(), 8, "the tuple attribute, header included");
        // A delete request carries that tuple back, in the entry's family.
        let request = delete_request(e, 1);
        assert_eq!(request[16], 2);
        assert_eq!(&request[20..28], &e.tuple[..]);
        // An error reply and a truncated message are errors, not panics.
        let err = message(NLMSG_ERROR, &(-1i32).to_ne_bytes());
        assert!(parse(&err, &mut entries).is_err());
        assert!(parse(&datagram[..datagram.len() - 3], &mut Vec::new()).is_err());
    }

    #[test]
    fn the_request_filters_by_mark() {
        let r = dump_request(0x7a00_0000, 0xff00_0000, 7);
        assert_eq!(u32_at(&r, 0), Some(r.len() as u32));
        assert_eq!(&r[r.len() - 8..r.len() - 4], &[8, 0, 21, 0]);
        assert_eq!(&r[r.len() - 4..], &[0xff, 0, 0, 0]);
    }

    #[test]
    fn stat_columns_are_summed_over_cpus() {
        let text = "entries  clashres found     new      invalid  ignore   delete   chainlength insert   insert_failed drop     early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    0000002a  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 00000001 00000002 00000010 00000000 00000000 00000000 00000000 00000000\n\
                    0000002a  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 00000001 00000002 00000000 00000000 00000000 00000000 00000000 00000000\n";
        assert_eq!(
            parse_stat(text),
            vec![("conntrack_drop", 4), ("conntrack_early_drop", 16), ("conntrack_insert_failed", 2)]
        );
    }
}
