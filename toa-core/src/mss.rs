//! Lowering the MSS a SYN or SYN-ACK announces.

use crate::Error;
use crate::checksum::{self, Accumulator};
use crate::option::kind;
use crate::packet::field::tcp;
use crate::packet::{TcpFlags, TcpPacket, read_u16};

/// The lowest MSS [`clamp_mss`] writes: Linux's default `tcp_min_snd_mss`.
pub const MIN_MSS: u16 = 48;

/// What [`clamp_mss`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MssClamp {
    /// The MSS the packet announced.
    pub old: u16,
    /// The MSS it announces now.
    pub new: u16,
}

/// Lowers the MSS option of the SYN or SYN-ACK in `buf[..len]` by `by` bytes
/// (never below [`MIN_MSS`], never raising it), fixing the TCP checksum
/// incrementally.
///
/// A load balancer that adds an 8-byte TOA to client segments clamps the
/// backend's SYN-ACK by 8, so the client never sends a full-sized segment
/// that would no longer fit. Returns `None` for a segment without SYN or a SYN
/// without an MSS option (nothing to clamp).
///
/// ```
/// use toa_core::{clamp_mss, MssClamp};
///
/// let mut syn_ack = [
///     0x45, 0, 0, 44, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 100, 125, 0, 1,
///     0x00, 0x50, 0x9c, 0x40, 0, 0, 0, 9, 0, 0, 0, 2, 0x60, 0x12, 0xff, 0xff, 0, 0, 0, 0,
///     2, 4, 0x05, 0xb4, // MSS 1460
/// ];
/// let clamp = clamp_mss(&mut syn_ack, 44, 8).unwrap();
/// assert_eq!(clamp, Some(MssClamp { old: 1460, new: 1452 }));
/// ```
pub fn clamp_mss(buf: &mut [u8], len: usize, by: u16) -> Result<Option<MssClamp>, Error> {
    let packet = buf.get(..len).ok_or(Error::Capacity { need: len, capacity: buf.len() })?;
    let packet = TcpPacket::new_checked(packet)?;
    let tcp_start = packet.tcp_offset();
    let header = packet.tcp();
    if !header.flags().contains(TcpFlags::SYN) {
        return Ok(None);
    }
    let mut at = None;
    for raw in header.options() {
        let raw = raw?;
        if raw.kind == kind::MSS {
            if raw.data.len() != 2 {
                // The walker guarantees the length fits a u8.
                let len = (raw.data.len() + 2) as u8;
                return Err(Error::MssLength { offset: raw.offset, len });
            }
            at.get_or_insert(raw.offset + 2);
        }
    }
    let Some(at) = at else { return Ok(None) };

    let old = read_u16(buf, at..at + 2);
    let new = if old > MIN_MSS { old.saturating_sub(by).max(MIN_MSS) } else { old };
    if new != old {
        // The value may sit at an odd offset (after a single NOP): sum it at its parity.
        let parity = at - tcp_start;
        let mut removed = Accumulator::new();
        removed.add_bytes_at(parity, &old.to_be_bytes());
        let mut added = Accumulator::new();
        added.add_bytes_at(parity, &new.to_be_bytes());
        buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
        let csum = tcp_start + tcp::CHECKSUM.start..tcp_start + tcp::CHECKSUM.end;
        let updated = checksum::update(read_u16(buf, csum.clone()), removed, added);
        buf[csum].copy_from_slice(&updated.to_be_bytes());
    }
    Ok(Some(MssClamp { old, new }))
}
