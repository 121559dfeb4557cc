//! The classic BPF filter of capture mode, generated from the listener's
//! port, the trust policy and the TOA formats: the kernel keeps, of
//! everything the packet socket sees, only TCP segments arriving (not sent)
//! to that port from a trusted source whose options hold a TOA-format kind.
//! Everything else is dropped in the kernel before a byte is copied.
//!
//! The packet socket is `SOCK_DGRAM`: offset 0 is the IP header.

use ipnet::IpNet;
use toa_core::Formats;

use crate::trust::TrustPolicy;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Insn {
    pub(crate) code: u16,
    pub(crate) jt: u8,
    pub(crate) jf: u8,
    pub(crate) k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MSH: u16 = 0xa0;
const ADD: u16 = 0x00;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const K: u16 = 0x00;
const X: u16 = 0x08;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;

/// `SKF_AD_OFF + SKF_AD_PROTOCOL` / `SKF_AD_PKTTYPE`: the skb's protocol and packet type.
const AD_PROTOCOL: u32 = (-0x1000i32) as u32;
const AD_PKTTYPE: u32 = (-0x1000i32 + 4) as u32;
/// `PACKET_OUTGOING`: what this host sends.
const PACKET_OUTGOING: u32 = 4;

/// How many options the filter walks past before it gives up (more than a
/// 40-byte area can hold that are not NOPs... and NOPs count one each).
pub(crate) const MAX_OPTIONS: usize = 40;
/// Bytes of each accepted packet copied to user space: the largest IPv4
/// header and the largest TCP header (IPv6: 40 + 60 fits too).
pub(crate) const SNAP: u32 = 120;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Accept,
    Drop,
    V4,
    V6,
    V4Trusted,
    V6Trusted,
    Tcp,
    /// The start of option walk step n.
    Step(usize),
    /// The next network to test, in the v6 trust checks.
    NextNet(usize),
}

/// A program under construction: instructions whose `ja` targets are labels.
struct Asm {
    code: Vec<(Insn, Option<Label>)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push((Insn { code, jt: 0, jf: 0, k }, None));
    }

    fn goto(&mut self, label: Label) {
        self.code.push((Insn { code: JMP | JA, jt: 0, jf: 0, k: 0 }, Some(label)));
    }

    /// When `A op k` holds, go to `label`; else go on.
    fn if_goto(&mut self, op: u16, k: u32, label: Label) {
        self.code.push((Insn { code: JMP | op | K, jt: 0, jf: 1, k }, None));
        self.goto(label);
    }

    /// When `A op k` does not hold, go to `label`; else go on.
    fn unless_goto(&mut self, op: u16, k: u32, label: Label) {
        self.code.push((Insn { code: JMP | op | K, jt: 1, jf: 0, k }, None));
        self.goto(label);
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.code.len()));
    }

    fn finish(self) -> Vec<Insn> {
        let at = |label: Label| {
            self.labels.iter().find(|(l, _)| *l == label).map(|(_, i)| *i).expect("label placed")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, (insn, target))| match target {
                // Every jump goes forward.
                Some(label) => Insn { k: (at(*label) - i - 1) as u32, ..*insn },
                None => *insn,
            })
            .collect()
    }
}

/// The filter for a listener on `port`.
pub(crate) fn program(port: u16, policy: &TrustPolicy, formats: &Formats) -> Vec<Insn> {
    let mut a = Asm { code: Vec::new(), labels: Vec::new() };
    let (v4_nets, v6_nets): (Vec<IpNet>, Vec<IpNet>) =
        policy.sources().nets().iter().partition(|n| matches!(n, IpNet::V4(_)));
    let mut kinds: Vec<u8> = formats.iter().map(|f| formats.kind(f)).collect();
    kinds.sort_unstable();
    kinds.dedup();

    a.op(LD | W | ABS, AD_PKTTYPE);
    a.if_goto(JEQ, PACKET_OUTGOING, Label::Drop);
    a.op(LD | W | ABS, AD_PROTOCOL);
    a.if_goto(JEQ, 0x0800, Label::V4);
    a.if_goto(JEQ, 0x86dd, Label::V6);
    a.goto(Label::Drop);

    // IPv4: TCP, not a later fragment, from a trusted source, to the port.
    a.label(Label::V4);
    a.op(LD | B | ABS, 9);
    a.unless_goto(JEQ, 6, Label::Drop);
    a.op(LD | H | ABS, 6);
    a.if_goto(JSET, 0x1fff, Label::Drop);
    if !policy.is_any() {
        for net in &v4_nets {
            let IpNet::V4(net) = net else { continue };
            a.op(LD | W | ABS, 12);
            a.op(ALU | AND | K, u32::from(net.netmask()));
            a.if_goto(JEQ, u32::from(net.network()), Label::V4Trusted);
        }
        a.goto(Label::Drop);
    }
    a.label(Label::V4Trusted);
    a.op(LDX | B | MSH, 0);
    a.op(LD | H | IND, 2);
    a.unless_goto(JEQ, u32::from(port), Label::Drop);
    a.op(MISC | TXA, 0);
    a.op(ST, 0);
    a.goto(Label::Tcp);

    // IPv6 (no extension headers before TCP): from a trusted source, to the port.
    a.label(Label::V6);
    a.op(LD | B | ABS, 6);
    a.unless_goto(JEQ, 6, Label::Drop);
    if !policy.is_any() {
        for (n, net) in v6_nets.iter().enumerate() {
            let IpNet::V6(net) = net else { continue };
            let bits = u128::from(net.network());
            let mask = u128::MAX.checked_shl(128 - u32::from(net.prefix_len())).unwrap_or(0);
            for word in 0..4 {
                let shift = 96 - 32 * word;
                let (m, v) = ((mask >> shift) as u32, (bits >> shift) as u32);
                if m == 0 {
                    break;
                }
                a.op(LD | W | ABS, 8 + 4 * word);
                a.op(ALU | AND | K, m);
                a.unless_goto(JEQ, v & m, Label::NextNet(n));
            }
            a.goto(Label::V6Trusted);
            a.label(Label::NextNet(n));
        }
        a.goto(Label::Drop);
    }
    a.label(Label::V6Trusted);
    a.op(LD | H | ABS, 42);
    a.unless_goto(JEQ, u32::from(port), Label::Drop);
    a.op(LD | IMM, 40);
    a.op(ST, 0);

    // TCP at M[0]: options present; their end in M[1]; walk them.
    a.label(Label::Tcp);
    a.op(LDX | W | MEM, 0);
    a.op(LD | B | IND, 12);
    a.op(ALU | AND | K, 0xf0);
    a.op(ALU | RSH | K, 2);
    a.unless_goto(JGT, 20, Label::Drop);
    a.op(ALU | ADD | X, 0);
    a.op(ST, 1);
    a.op(MISC | TXA, 0);
    a.op(ALU | ADD | K, 20);
    a.op(MISC | TAX, 0);
    for step in 0..MAX_OPTIONS {
        a.label(Label::Step(step));
        // The end of the area (M[1]) must lie beyond X.
        a.op(LD | W | MEM, 1);
        a.code.push((Insn { code: JMP | JGT | X, jt: 1, jf: 0, k: 0 }, None));
        a.goto(Label::Drop);
        a.op(LD | B | IND, 0);
        a.if_goto(JEQ, 0, Label::Drop);
        for kind in &kinds {
            a.if_goto(JEQ, u32::from(*kind), Label::Accept);
        }
        // NOP: one byte. Others: their length byte, at least 2.
        a.code.push((Insn { code: JMP | JEQ | K, jt: 0, jf: 4, k: 1 }, None));
        a.op(MISC | TXA, 0);
        a.op(ALU | ADD | K, 1);
        a.op(MISC | TAX, 0);
        a.goto(Label::Step(step + 1));
        a.op(LD | B | IND, 1);
        a.unless_goto(JGE, 2, Label::Drop);
        a.op(ALU | ADD | X, 0);
        a.op(MISC | TAX, 0);
    }
    a.label(Label::Step(MAX_OPTIONS));
    a.label(Label::Drop);
    a.op(RET | K, 0);
    a.label(Label::Accept);
    a.op(RET | K, SNAP);
    a.finish()
}

/// Runs `program` on a packet as the kernel would (`protocol` the
/// EtherType, `pkttype` the skb's type); returns the bytes to keep (0: drop).
#[cfg(test)]
pub(crate) fn run(program: &[Insn], packet: &[u8], protocol: u16, pkttype: u32) -> u32 {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0;
    let load = |at: u32, size: usize| -> Option<u32> {
        match at {
            AD_PROTOCOL => Some(u32::from(protocol)),
            AD_PKTTYPE => Some(pkttype),
            _ => {
                let at = at as usize;
                let bytes = packet.get(at..at.checked_add(size)?)?;
                Some(bytes.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)))
            }
        }
    };
    while pc < program.len() {
        let i = program[pc];
        pc += 1;
        let size = match i.code & 0x18 {
            H => 2,
            B => 1,
            _ => 4,
        };
        match i.code & 0x07 {
            LD => match i.code & 0xe0 {
                IMM => a = i.k,
                ABS => match load(i.k, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                IND => match load(x.wrapping_add(i.k), size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                MEM => a = mem[i.k as usize],
                other => panic!("ld mode {other:#x}"),
            },
            LDX => match i.code & 0xe0 {
                MSH => match load(i.k, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                MEM => x = mem[i.k as usize],
                other => panic!("ldx mode {other:#x}"),
            },
            ST => mem[i.k as usize] = a,
            ALU => {
                let operand = if i.code & X != 0 { x } else { i.k };
                a = match i.code & 0xf0 {
                    ADD => a.wrapping_add(operand),
                    AND => a & operand,
                    RSH => a >> operand,
                    other => panic!("alu {other:#x}"),
                };
            }
            JMP => {
                let operand = if i.code & X != 0 { x } else { i.k };
                let taken = match i.code & 0xf0 {
                    JA => {
                        pc += i.k as usize;
                        continue;
                    }
                    JEQ => a == operand,
                    JGT => a > operand,
                    JGE => a >= operand,
                    JSET => a & operand != 0,
                    other => panic!("jmp {other:#x}"),
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            RET => return i.k,
            MISC => {
                if i.code & 0xf8 == TXA {
                    a = x;
                } else {
                    x = a;
                }
            }
            other => panic!("class {other:#x}"),
        }
    }
    panic!("fell off the end of the program")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;
    use toa_core::{Format, Options, Toa};

    fn policy() -> TrustPolicy {
        let sources = ["100.125.0.0/16", "10.1.0.0/16", "2001:db8:64::/48"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        TrustPolicy::new(sources).unwrap()
    }

    fn tcp(src: IpAddr, dst_port: u16, options: &[u8]) -> (Vec<u8>, u16) {
        let doff = 20 + options.len().next_multiple_of(4);
        let mut tcp = vec![0u8; doff];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
        tcp[12] = ((doff / 4) as u8) << 4;
        tcp[13] = 0x10;
        tcp[20..20 + options.len()].copy_from_slice(options);
        match src {
            IpAddr::V4(v4) => {
                let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
                ip.extend_from_slice(&v4.octets());
                ip.extend_from_slice(&[192, 0, 2, 10]);
                ip[2..4].copy_from_slice(&((20 + doff) as u16).to_be_bytes());
                ([ip, tcp].concat(), 0x0800)
            }
            IpAddr::V6(v6) => {
                let mut ip = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
                ip[4..6].copy_from_slice(&(doff as u16).to_be_bytes());
                ip.extend_from_slice(&v6.octets());
                ip.extend_from_slice(&"2001:db8:be::a".parse::<std::net::Ipv6Addr>().unwrap().octets());
                ([ip, tcp].concat(), 0x86dd)
            }
        }
    }

    fn toa_option() -> Vec<u8> {
        let mut buf = [0u8; 20];
        let n =
            Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap().emit(254, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn keeps_trusted_toas_to_the_port_only() {
        let prog = program(8080, &policy(), &Formats::default());
        assert!(prog.len() < 4096, "{} instructions", prog.len());
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
        let with_toa = [ts.as_slice(), &toa_option()].concat();
        let keep = |src: &str, port: u16, options: &[u8], pkttype: u32| {
            let (packet, proto) = tcp(src.parse().unwrap(), port, options);
            run(&prog, &packet, proto, pkttype)
        };
        assert_eq!(keep("100.125.0.1", 8080, &with_toa, 0), SNAP);
        assert_eq!(keep("100.125.0.1", 8080, &toa_option(), 0), SNAP);
        assert_eq!(keep("2001:db8:64::1", 8080, &with_toa, 0), SNAP);
        assert_eq!(keep("10.1.2.3", 8080, &with_toa, 0), SNAP, "a second trusted network");
        assert_eq!(keep("100.125.0.1", 8080, &with_toa, PACKET_OUTGOING), 0, "outgoing");
        assert_eq!(keep("198.51.100.9", 8080, &with_toa, 0), 0, "untrusted");
        assert_eq!(keep("2001:db8:65::1", 8080, &with_toa, 0), 0, "untrusted v6");
        assert_eq!(keep("100.125.0.1", 8081, &with_toa, 0), 0, "another port");
        assert_eq!(keep("100.125.0.1", 8080, &ts, 0), 0, "no TOA");
        assert_eq!(keep("100.125.0.1", 8080, &[], 0), 0, "no options");
        // After an EOL: padding.
        assert_eq!(keep("100.125.0.1", 8080, &[0, 254, 8, 0, 0, 0, 0, 0], 0), 0);
        // A malformed length ends the walk.
        assert_eq!(keep("100.125.0.1", 8080, &[3, 1, 254, 8, 0, 0, 0, 0], 0), 0);
        // trust_any: any source.
        let any = program(8080, &TrustPolicy::any(), &Formats::default());
        let (packet, proto) = tcp("198.51.100.9".parse().unwrap(), 8080, &with_toa);
        assert_eq!(run(&any, &packet, proto, 0), SNAP);
    }

    proptest! {
        /// Against toa-core's walker: whatever holds a TOA-format option in a
        /// well-formed walk is kept when it comes from a trusted source to the
        /// port; whatever is kept comes from there and holds such a kind.
        #[test]
        fn agrees_with_the_options_walker(
            options in prop::collection::vec(any::<u8>(), 0..=40),
            toa_at in prop::option::of(0usize..=32),
            src in prop_oneof![Just("100.125.9.9"), Just("198.51.100.9"), Just("2001:db8:64::9"), Just("2001:db8:99::9")],
            port in prop_oneof![Just(8080u16), Just(80)],
        ) {
            let mut options = options;
            if let Some(at) = toa_at {
                let at = at.min(options.len());
                options.splice(at..at, toa_option());
                options.truncate(40);
            }
            let formats = Formats::default();
            let prog = program(8080, &policy(), &formats);
            let src: IpAddr = src.parse().unwrap();
            let (packet, proto) = tcp(src, port, &options);
            let kept = run(&prog, &packet, proto, 0) != 0;
            let area = &packet[packet.len() - options.len().next_multiple_of(4)..];
            let mut has_toa_kind = false;
            for raw in Options::new(area, 0) {
                match raw {
                    Ok(o) if o.kind == 254 => { has_toa_kind = true; break; }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let wanted = policy().trusts(src) && port == 8080;
            if wanted && has_toa_kind {
                prop_assert!(kept, "dropped a trusted TOA: {options:?}");
            }
            if kept {
                prop_assert!(wanted, "kept from {src} to {port}");
                prop_assert!(area.contains(&254), "kept without a TOA kind: {options:?}");
            }
        }
    }
}
