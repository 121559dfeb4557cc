//! The vendor formats of the TOA option and the configuration that enables them.

use core::fmt;
use core::str::FromStr;

/// One vendor's TOA encoding.
///
/// | format | kind/len | body |
/// |---|---|---|
/// | `toa` | 254/8 | port(2) IPv4(4) |
/// | `toa6` | 254/20 | port(2) IPv6(16) |
/// | `ali-v6` | 253/20 | port(2) IPv6(16) |
/// | `tencent` | 200/8 | port(2) IPv4(4) |
/// | `ali-cdn` | 28/7, 28/19 | version(1) IPv4 or IPv6, no port |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Kind 254, length 8: port and IPv4 address. Huawei ELB, LVS, DPVS, UCloud.
    Toa,
    /// Kind 254, length 20: port and IPv6 address. DPVS, also for NAT64 (an
    /// IPv6 client behind an IPv4 backend connection).
    Toa6,
    /// Kind 253, length 20: port and IPv6 address. Alibaba LVS.
    AliV6,
    /// Kind 200, length 8: port and IPv4 address. Tencent CLB, which may add
    /// kind 201 (VPC id) and kind 202 (VIP); see [`TencentMeta`](crate::TencentMeta).
    Tencent,
    /// Kind 28, length 7 or 19: a version byte and an IPv4 or IPv6 address, no
    /// port. Alibaba CDN. Kind 28 is also RFC 5482 User Timeout, so only these
    /// two lengths are taken as TOA, and only when this format is enabled.
    AliCdn,
}

impl Format {
    /// Every format, in table order.
    pub const ALL: [Format; 5] = [Format::Toa, Format::Toa6, Format::AliV6, Format::Tencent, Format::AliCdn];

    /// The name used in configuration and output (`toa`, `toa6`, `ali-v6`, `tencent`, `ali-cdn`).
    pub const fn name(self) -> &'static str {
        match self {
            Format::Toa => "toa",
            Format::Toa6 => "toa6",
            Format::AliV6 => "ali-v6",
            Format::Tencent => "tencent",
            Format::AliCdn => "ali-cdn",
        }
    }

    /// The option kind vendors use unless an operator renumbered it.
    pub const fn default_kind(self) -> u8 {
        match self {
            Format::Toa | Format::Toa6 => 254,
            Format::AliV6 => 253,
            Format::Tencent => 200,
            Format::AliCdn => 28,
        }
    }

    /// Whether an option of length `len` (kind and length bytes included) is this format.
    pub const fn accepts_len(self, len: u8) -> bool {
        match self {
            Format::Toa | Format::Tencent => len == 8,
            Format::Toa6 | Format::AliV6 => len == 20,
            Format::AliCdn => len == 7 || len == 19,
        }
    }

    /// Whether the format owns its kind outright. A kind-28 option of another
    /// length is a legitimate User Timeout, not a malformed TOA.
    pub(crate) const fn owns_kind(self) -> bool {
        !matches!(self, Format::AliCdn)
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name given to [`Format::from_str`] is not a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownFormat;

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown toa format (expected one of toa, toa6, ali-v6, tencent, ali-cdn)")
    }
}

impl core::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;

    /// ```
    /// use toa_core::Format;
    /// assert_eq!("ali-v6".parse(), Ok(Format::AliV6));
    /// assert!("toa7".parse::<Format>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL.into_iter().find(|f| f.name() == s).ok_or(UnknownFormat)
    }
}

/// Which formats are accepted, and the option kind of each.
///
/// The default is `toa` + `toa6` with the vendors' kinds. Kinds can be
/// overridden because operators renumber them.
///
/// ```
/// use toa_core::{Format, Formats};
///
/// let formats = Formats::default().with(Format::Tencent).with_kind(Format::Toa, 252);
/// assert!(formats.contains(Format::Tencent));
/// assert_eq!(formats.kind(Format::Toa), 252);
/// assert_eq!(formats.kind(Format::Toa6), 254);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Formats {
    enabled: u8,
    kinds: [u8; 5],
    /// The kinds of the enabled formats as a 256-bit set, so that the common
    /// case (MSS, SACK, timestamps, window scale) is rejected with one test.
    interest: [u64; 4],
}

impl Default for Formats {
    fn default() -> Self {
        Self::NONE.with(Format::Toa).with(Format::Toa6)
    }
}

/// How the options walker classifies one option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Not a TOA of any enabled format.
    Other,
    /// A TOA of this format.
    Toa(Format),
    /// A kind owned by an enabled format with a length none of them uses.
    Malformed,
}

impl Formats {
    /// No format enabled (kinds at their defaults).
    pub const NONE: Formats = Formats {
        enabled: 0,
        interest: [0; 4],
        kinds: [
            Format::Toa.default_kind(),
            Format::Toa6.default_kind(),
            Format::AliV6.default_kind(),
            Format::Tencent.default_kind(),
            Format::AliCdn.default_kind(),
        ],
    };

    /// Every format enabled.
    pub const ALL: Formats = Formats { enabled: 0b1_1111, ..Formats::NONE }.index_kinds();

    /// Recomputes `interest` after a change.
    const fn index_kinds(mut self) -> Self {
        self.interest = [0; 4];
        let mut i = 0;
        while i < Format::ALL.len() {
            if self.enabled & (1 << i) != 0 {
                let kind = self.kinds[i] as usize;
                self.interest[kind / 64] |= 1 << (kind % 64);
            }
            i += 1;
        }
        self
    }

    /// Enables `format`.
    #[must_use]
    pub const fn with(mut self, format: Format) -> Self {
        self.enabled |= 1 << format.index();
        self.index_kinds()
    }

    /// Disables `format`.
    #[must_use]
    pub const fn without(mut self, format: Format) -> Self {
        self.enabled &= !(1 << format.index());
        self.index_kinds()
    }

    /// Sets the option kind `format` uses (e.g. an operator's renumbered TOA).
    #[must_use]
    pub const fn with_kind(mut self, format: Format, kind: u8) -> Self {
        self.kinds[format.index()] = kind;
        self.index_kinds()
    }

    /// Whether `format` is enabled.
    pub const fn contains(&self, format: Format) -> bool {
        self.enabled & (1 << format.index()) != 0
    }

    /// The option kind of `format`.
    pub const fn kind(&self, format: Format) -> u8 {
        self.kinds[format.index()]
    }

    /// Whether no format is enabled.
    pub const fn is_empty(&self) -> bool {
        self.enabled == 0
    }

    /// The enabled formats, in table order.
    pub fn iter(&self) -> impl Iterator<Item = Format> + '_ {
        Format::ALL.into_iter().filter(|f| self.contains(*f))
    }

    /// Classifies an option by kind and length. The first enabled format in
    /// table order wins when renumbering made two formats share a kind and length.
    #[inline]
    pub(crate) fn classify(&self, kind: u8, len: u8) -> Class {
        if self.interest[usize::from(kind / 64)] & (1 << (kind % 64)) == 0 {
            return Class::Other;
        }
        self.classify_slow(kind, len)
    }

    #[inline]
    fn classify_slow(&self, kind: u8, len: u8) -> Class {
        let mut owned = false;
        for format in Format::ALL {
            if !self.contains(format) || self.kind(format) != kind {
                continue;
            }
            if format.accepts_len(len) {
                return Class::Toa(format);
            }
            owned |= format.owns_kind();
        }
        if owned { Class::Malformed } else { Class::Other }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let all = Formats::ALL;
        assert_eq!(all.classify(254, 8), Class::Toa(Format::Toa));
        assert_eq!(all.classify(254, 20), Class::Toa(Format::Toa6));
        assert_eq!(all.classify(254, 10), Class::Malformed);
        assert_eq!(all.classify(253, 20), Class::Toa(Format::AliV6));
        assert_eq!(all.classify(253, 8), Class::Malformed);
        assert_eq!(all.classify(200, 8), Class::Toa(Format::Tencent));
        assert_eq!(all.classify(28, 7), Class::Toa(Format::AliCdn));
        assert_eq!(all.classify(28, 19), Class::Toa(Format::AliCdn));
        // RFC 5482 User Timeout keeps its meaning.
        assert_eq!(all.classify(28, 4), Class::Other);
        assert_eq!(all.classify(2, 4), Class::Other);
        // Disabled formats are invisible.
        let default = Formats::default();
        assert_eq!(default.classify(28, 7), Class::Other);
        assert_eq!(default.classify(200, 8), Class::Other);
        assert_eq!(Formats::NONE.classify(254, 8), Class::Other);
    }

    #[test]
    fn renumbered_kind() {
        let f = Formats::default().with_kind(Format::Toa, 30).with_kind(Format::Toa6, 30);
        assert_eq!(f.classify(30, 8), Class::Toa(Format::Toa));
        assert_eq!(f.classify(254, 8), Class::Other);
    }
}
