//! The TCP options walker and the TOA option representation.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use crate::format::Class;
use crate::{Error, Format, Formats};

/// Well-known option kinds.
pub mod kind {
    /// End of option list (RFC 9293).
    pub const EOL: u8 = 0;
    /// No-operation, used as padding (RFC 9293).
    pub const NOP: u8 = 1;
    /// Maximum segment size (RFC 9293).
    pub const MSS: u8 = 2;
    /// Tencent CLB: the VPC id, length 6, body a 32-bit id.
    pub const TENCENT_VPC_ID: u8 = 201;
    /// Tencent CLB: the VIP the client connected to, length 8, body port and IPv4.
    pub const TENCENT_VIP: u8 = 202;
}

/// One option as it stands in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawOption<'a> {
    /// Where the option's kind byte is.
    pub offset: usize,
    /// The option kind.
    pub kind: u8,
    /// The option body: everything after the kind and length bytes (empty for EOL and NOP).
    pub data: &'a [u8],
}

impl RawOption<'_> {
    /// The bytes the option takes in the header: 1 for EOL and NOP, else its length byte.
    #[inline]
    pub fn wire_len(&self) -> usize {
        match self.kind {
            kind::EOL | kind::NOP => 1,
            _ => self.data.len() + 2,
        }
    }
}

/// An iterator over the options of a TCP header.
///
/// It stops after an EOL option (what follows is padding) and after the first
/// error; a malformed option is an [`Error`] with its offset, never a panic.
///
/// ```
/// use toa_core::{Error, Options};
///
/// // MSS 1460, NOP, NOP, then an option claiming 10 bytes with 4 left.
/// let bytes = [2, 4, 0x05, 0xb4, 1, 1, 254, 10, 0, 0];
/// let mut options = Options::new(&bytes, 20);
/// assert_eq!(options.next().unwrap().unwrap().data, &[0x05, 0xb4]);
/// assert_eq!(options.next().unwrap().unwrap().kind, 1);
/// assert_eq!(options.next().unwrap().unwrap().kind, 1);
/// assert_eq!(
///     options.next(),
///     Some(Err(Error::OptionOverrun { offset: 26, kind: 254, len: Some(10), available: 4 }))
/// );
/// assert_eq!(options.next(), None);
/// ```
#[derive(Clone, Debug)]
pub struct Options<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Options<'a> {
    /// Walks `bytes`, an options area that starts at byte `base` of the
    /// caller's buffer (offsets in items and errors are `base`-relative).
    pub fn new(bytes: &'a [u8], base: usize) -> Self {
        Self { bytes, pos: 0, base }
    }

    /// The first TOA of an enabled format.
    ///
    /// When a header holds several TOA options the first one wins: it is the
    /// one an LVS-style writer puts right after the base header. Every option
    /// up to it is checked (a malformed one is an error), none after it: this
    /// is the per-connection hot path, and what follows cannot change the
    /// answer. [`Options::toas`] walks and checks the whole area.
    #[inline]
    pub fn first_toa(self, formats: &Formats) -> Result<Option<ToaOption>, Error> {
        match self.locate(formats) {
            Scan::Clean => Ok(None),
            Scan::Found(i, format) => {
                let bytes = self.bytes;
                let len = bytes[i + 1];
                let toa = Toa::decode(format, &bytes[i + 2..i + usize::from(len)]);
                Ok(Some(ToaOption { toa, offset: self.base + i, kind: bytes[i], len }))
            }
            Scan::Bad(i) => Err(self.error_at(i, formats)),
        }
    }

    /// The hot path of every backend and LB: one tight pass over the bytes
    /// up to the first TOA, with the same checks as the iterators, returning a
    /// two-word value (the iterators build the errors, off the hot path).
    #[inline]
    fn locate(&self, formats: &Formats) -> Scan {
        let bytes = self.bytes;
        let end = bytes.len();
        let mut i = self.pos;
        while i < end {
            let kind = bytes[i];
            if kind <= kind::NOP {
                if kind == kind::EOL {
                    break;
                }
                i += 1;
                continue;
            }
            if i + 1 >= end {
                return Scan::Bad(i);
            }
            let len = bytes[i + 1];
            if len < 2 || usize::from(len) > end - i {
                return Scan::Bad(i);
            }
            match formats.classify(kind, len) {
                Class::Other => {}
                Class::Toa(format) => return Scan::Found(i, format),
                Class::Malformed => return Scan::Bad(i),
            }
            i += usize::from(len);
        }
        Scan::Clean
    }

    /// The error the iterators report for the bad option at `pos`.
    #[cold]
    fn error_at(&self, pos: usize, formats: &Formats) -> Error {
        let at = Options { bytes: self.bytes, pos, base: self.base };
        match at.toas(formats).next() {
            Some(Err(err)) => err,
            _ => unreachable!("the option at {pos} is malformed"),
        }
    }

    /// Every TOA of an enabled format, in header order.
    pub fn toas(self, formats: &Formats) -> Toas<'a> {
        Toas { options: self, formats: *formats }
    }

    /// The Tencent CLB companions of a `tencent` TOA: kind 201 (VPC id) and
    /// kind 202 (VIP). Either may be absent; options of those kinds with other
    /// lengths are ignored.
    pub fn tencent_meta(self) -> Result<TencentMeta, Error> {
        let mut meta = TencentMeta::default();
        for option in self {
            let option = option?;
            match (option.kind, option.data) {
                (kind::TENCENT_VPC_ID, &[a, b, c, d]) if meta.vpc_id.is_none() => {
                    meta.vpc_id = Some(u32::from_be_bytes([a, b, c, d]));
                }
                (kind::TENCENT_VIP, &[p0, p1, a, b, c, d]) if meta.vip.is_none() => {
                    let ip = Ipv4Addr::new(a, b, c, d);
                    meta.vip = Some(SocketAddrV4::new(ip, u16::from_be_bytes([p0, p1])));
                }
                _ => {}
            }
        }
        Ok(meta)
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = Result<RawOption<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.pos..)?;
        let (&kind, after) = rest.split_first()?;
        let offset = self.base + self.pos;
        match kind {
            kind::EOL => {
                self.pos = self.bytes.len();
                return Some(Ok(RawOption { offset, kind, data: &[] }));
            }
            kind::NOP => {
                self.pos += 1;
                return Some(Ok(RawOption { offset, kind, data: &[] }));
            }
            _ => {}
        }
        // Every error ends the walk: nothing after a bad length can be trusted.
        let fail = |this: &mut Self, err| {
            this.pos = this.bytes.len();
            Some(Err(err))
        };
        let Some(&len) = after.first() else {
            return fail(self, Error::OptionOverrun { offset, kind, len: None, available: 1 });
        };
        if len < 2 {
            return fail(self, Error::OptionLength { offset, kind, len });
        }
        let Some(data) = rest.get(2..usize::from(len)) else {
            let available = rest.len();
            return fail(self, Error::OptionOverrun { offset, kind, len: Some(len), available });
        };
        self.pos += usize::from(len);
        Some(Ok(RawOption { offset, kind, data }))
    }
}

/// What `Options::locate` found.
#[derive(Clone, Copy)]
enum Scan {
    /// A well-formed area without TOA.
    Clean,
    /// The first TOA is at this position (and every option before it is well formed).
    Found(usize, Format),
    /// A malformed option at this position.
    Bad(usize),
}

/// The Tencent CLB options that may follow a `tencent` TOA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TencentMeta {
    /// Kind 201: the id of the client's VPC.
    pub vpc_id: Option<u32>,
    /// Kind 202: the VIP (address and port) the client connected to.
    pub vip: Option<SocketAddrV4>,
}

/// A TOA found in a header, with where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToaOption {
    /// The decoded option.
    pub toa: Toa,
    /// Where the option's kind byte is.
    pub offset: usize,
    /// The option kind as found.
    pub kind: u8,
    /// The option length as found.
    pub len: u8,
}

/// An iterator over the TOA options of a header; see [`Options::toas`].
#[derive(Clone, Debug)]
pub struct Toas<'a> {
    options: Options<'a>,
    formats: Formats,
}

impl Iterator for Toas<'_> {
    type Item = Result<ToaOption, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let option = match self.options.next()? {
                Ok(option) => option,
                Err(err) => return Some(Err(err)),
            };
            if matches!(option.kind, kind::EOL | kind::NOP) {
                continue;
            }
            // The walker guarantees the length byte equals data + 2 and fits a u8.
            let len = (option.data.len() + 2) as u8;
            match self.formats.classify(option.kind, len) {
                Class::Other => continue,
                Class::Malformed => {
                    self.options.pos = self.options.bytes.len();
                    let (offset, kind) = (option.offset, option.kind);
                    return Some(Err(Error::ToaLength { offset, kind, len }));
                }
                Class::Toa(format) => {
                    let toa = Toa::decode(format, option.data);
                    return Some(Ok(ToaOption { toa, offset: option.offset, kind: option.kind, len }));
                }
            }
        }
    }
}

/// A decoded TOA: the client address an LB wrote into the option.
///
/// ```
/// use toa_core::{Format, Formats, Toa};
///
/// let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
/// let mut out = [0u8; 8];
/// let len = toa.emit(Formats::default().kind(Format::Toa), &mut out).unwrap();
/// // kind, length, port 40000, 203.0.113.7
/// assert_eq!(out[..len], [254, 8, 0x9c, 0x40, 203, 0, 113, 7]);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Toa {
    // Plain aligned integers rather than an `IpAddr` (17 bytes, align 1): the
    // decoder's stores and a caller's loads then line up, which keeps the
    // returned value out of store-forwarding stalls on the hot path.
    /// The IPv6 address bits, or the IPv4 bits in the low 32 when `!v6`.
    bits: u128,
    /// Meaningless for `ali-cdn`.
    port: u16,
    format: Format,
    /// Only for `ali-cdn`.
    version: u8,
    v6: bool,
}

impl fmt::Debug for Toa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Toa");
        s.field("format", &self.format).field("ip", &self.ip());
        match self.format {
            Format::AliCdn => s.field("version", &self.version),
            _ => s.field("port", &self.port),
        };
        s.finish()
    }
}

impl Toa {
    /// A TOA of a format that carries a port: every format but `ali-cdn`
    /// (use [`Toa::ali_cdn`]). `toa` and `tencent` need an IPv4 address,
    /// `toa6` and `ali-v6` an IPv6 one.
    pub fn new(format: Format, addr: SocketAddr) -> Result<Self, Error> {
        let fits = match format {
            Format::Toa | Format::Tencent => addr.is_ipv4(),
            Format::Toa6 | Format::AliV6 => addr.is_ipv6(),
            Format::AliCdn => false,
        };
        if !fits {
            return Err(Error::Unrepresentable { format });
        }
        Ok(Self::from_parts(format, addr.ip(), addr.port(), 0))
    }

    /// An Alibaba CDN TOA: a version byte and an address, no port.
    pub fn ali_cdn(version: u8, ip: IpAddr) -> Self {
        Self::from_parts(Format::AliCdn, ip, 0, version)
    }

    fn from_parts(format: Format, ip: IpAddr, port: u16, version: u8) -> Self {
        let (bits, v6) = match ip {
            IpAddr::V4(ip) => (u128::from(ip.to_bits()), false),
            IpAddr::V6(ip) => (ip.to_bits(), true),
        };
        Self { bits, port, format, version, v6 }
    }

    /// The format.
    #[inline]
    pub fn format(&self) -> Format {
        self.format
    }

    /// The client IP address.
    #[inline]
    pub fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from_bits(self.bits))
        } else {
            // The low 32 bits hold the IPv4 address.
            IpAddr::V4(Ipv4Addr::from_bits(self.bits as u32))
        }
    }

    /// The client port; `None` for `ali-cdn`, which carries none.
    #[inline]
    pub fn port(&self) -> Option<u16> {
        (self.format != Format::AliCdn).then_some(self.port)
    }

    /// The client socket address; `None` for `ali-cdn`.
    #[inline]
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.port().map(|port| SocketAddr::new(self.ip(), port))
    }

    /// The `ali-cdn` version byte; `None` for other formats.
    #[inline]
    pub fn cdn_version(&self) -> Option<u8> {
        (self.format == Format::AliCdn).then_some(self.version)
    }

    /// The option's size on the wire, kind and length bytes included.
    #[inline]
    pub fn wire_len(&self) -> usize {
        match (self.format, self.v6) {
            (Format::AliCdn, false) => 7,
            (Format::AliCdn, true) => 19,
            (_, false) => 8,
            (_, true) => 20,
        }
    }

    /// Writes the option with option kind `kind` to the front of `out`;
    /// returns the bytes written ([`Toa::wire_len`]).
    pub fn emit(&self, kind: u8, out: &mut [u8]) -> Result<usize, Error> {
        let len = self.wire_len();
        let Some(out) = out.get_mut(..len) else {
            return Err(Error::Capacity { need: len, capacity: out.len() });
        };
        out[0] = kind;
        // wire_len() is at most 20.
        out[1] = len as u8;
        let body = &mut out[2..];
        let addr = if self.format == Format::AliCdn {
            body[0] = self.version;
            &mut body[1..]
        } else {
            body[..2].copy_from_slice(&self.port.to_be_bytes());
            &mut body[2..]
        };
        if self.v6 {
            addr.copy_from_slice(&self.bits.to_be_bytes());
        } else {
            addr.copy_from_slice(&(self.bits as u32).to_be_bytes());
        }
        Ok(len)
    }

    /// Decodes an option body whose length `format.accepts_len` approved.
    #[inline]
    fn decode(format: Format, data: &[u8]) -> Toa {
        let (head, addr) = data.split_at(if format == Format::AliCdn { 1 } else { 2 });
        let (bits, v6) = match *addr {
            [a, b, c, d] => (u128::from(u32::from_be_bytes([a, b, c, d])), false),
            _ => {
                let mut v6 = [0u8; 16];
                v6.copy_from_slice(&addr[..16]);
                (u128::from_be_bytes(v6), true)
            }
        };
        let (port, version) = match *head {
            [version] => (0, version),
            [p0, p1] => (u16::from_be_bytes([p0, p1]), 0),
            _ => unreachable!("split_at(1 or 2)"),
        };
        Toa { bits, port, format, version, v6 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn eol_ends_the_walk() {
        let bytes = [1, 0, 0xff, 0xff];
        let kinds: Result<Vec<u8>, _> = Options::new(&bytes, 0).map(|o| o.map(|o| o.kind)).collect();
        assert_eq!(kinds.unwrap(), [1, 0]);
    }

    #[test]
    fn missing_length_byte() {
        let mut o = Options::new(&[1, 254], 20);
        assert!(o.next().unwrap().is_ok());
        assert_eq!(
            o.next(),
            Some(Err(Error::OptionOverrun { offset: 21, kind: 254, len: None, available: 1 }))
        );
        assert_eq!(o.next(), None);
    }

    #[test]
    fn malformed_toa_length_is_an_error() {
        let bytes = [254, 10, 0, 0, 0, 0, 0, 0, 0, 0];
        let got = Options::new(&bytes, 0).first_toa(&Formats::default());
        assert_eq!(got, Err(Error::ToaLength { offset: 0, kind: 254, len: 10 }));
        // With toa formats disabled it is just an unknown option.
        assert_eq!(Options::new(&bytes, 0).first_toa(&Formats::NONE), Ok(None));
    }

    #[test]
    fn tencent_meta_is_optional() {
        let bytes = [200, 8, 0, 80, 203, 0, 113, 1, 201, 6, 0, 0, 0, 42, 202, 8, 1, 187, 100, 125, 0, 9];
        let meta = Options::new(&bytes, 0).tencent_meta().unwrap();
        assert_eq!(meta.vpc_id, Some(42));
        assert_eq!(meta.vip, Some("100.125.0.9:443".parse().unwrap()));
        assert_eq!(Options::new(&bytes[..8], 0).tencent_meta(), Ok(TencentMeta::default()));
    }
}
