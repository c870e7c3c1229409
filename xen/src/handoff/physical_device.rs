//! The [`PHYSICAL_DEVICE`](super::PHYSICAL_DEVICE) and [`DISKSEQ`](super::DISKSEQ) node
//! values: `major:minor` or the series' `diskseq@major:minor` (hex, as `sscanf("%x")` reads
//! them), and the diskseq alone.

use std::fmt;
use std::str::FromStr;

/// Largest major number a Linux `dev_t` can hold inside the kernel (12 bits).
pub const MAX_MAJOR: u32 = 0xfff;
/// Largest minor number a Linux `dev_t` can hold inside the kernel (20 bits).
pub const MAX_MINOR: u32 = 0xf_ffff;
/// Longest diskseq in hex (the series' `%16llx`).
const MAX_DISKSEQ_DIGITS: usize = 16;
/// Longest major or minor in hex (the series' `%8x`).
const MAX_NUMBER_DIGITS: usize = 8;

/// Why a `physical-device` or `diskseq` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The value is empty.
    #[error("empty value")]
    Empty,
    /// No `:` between major and minor.
    #[error("no ':' between major and minor")]
    MissingColon,
    /// A field is empty or holds something other than hex digits.
    #[error("{field} is not a hex number")]
    NotHex {
        /// Which field.
        field: &'static str,
    },
    /// A field has more digits than its format allows.
    #[error("{field} has more than {max} hex digits")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// A leading zero where the format has exactly one spelling per number (diskseq, and
    /// major/minor in the `diskseq@` form).
    #[error("{field} has a leading zero")]
    LeadingZero {
        /// Which field.
        field: &'static str,
    },
    /// Diskseq 0 is never a device's sequence number.
    #[error("diskseq 0 is invalid")]
    ZeroDiskseq,
    /// A major or minor number a Linux `dev_t` cannot hold.
    #[error("{field} {value:#x} is out of range")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u32,
    },
}

/// The device a backend serves, as the `physical-device` node names it.
///
/// Two forms: `major:minor` (Linux blkback's `"%x:%x"`) and the RFC series'
/// `diskseq@major:minor`, which makes a backend refuse the device unless its diskseq matches, so
/// that a device number reused by another device is never served by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysicalDevice {
    /// Major device number (at most [`MAX_MAJOR`]).
    pub major: u32,
    /// Minor device number (at most [`MAX_MINOR`]).
    pub minor: u32,
    /// The disk sequence number; `None` when not known. `Some(0)` is never parsed; it is
    /// formatted as `None` (in the series 0 means "no check").
    pub diskseq: Option<u64>,
}

impl PhysicalDevice {
    /// Parses a `physical-device` value strictly: hex digits only, no sign, no `0x`, no white
    /// space, nothing after the minor; major and minor at most 8 digits each and within a Linux
    /// `dev_t`. The plain form takes either case and leading zeros (as `sscanf("%x:%x")` does);
    /// the `diskseq@` form is canonical, as the series' blkback requires
    /// (kernel-patches/README.md): lower-case, no leading zeros (`0` alone is fine for major and
    /// minor), diskseq 1 to 16 digits and not 0.
    ///
    /// # Errors
    /// [`ParseError`] saying what is wrong.
    pub fn parse(value: &[u8]) -> Result<Self, ParseError> {
        if value.is_empty() {
            return Err(ParseError::Empty);
        }
        let (diskseq, rest) = match value.iter().position(|&b| b == b'@') {
            Some(at) => (Some(parse_diskseq(&value[..at])?), &value[at + 1..]),
            None => (None, value),
        };
        let canonical = diskseq.is_some();
        let colon = rest
            .iter()
            .position(|&b| b == b':')
            .ok_or(ParseError::MissingColon)?;
        let major = parse_number(&rest[..colon], "major", canonical)?;
        let minor = parse_number(&rest[colon + 1..], "minor", canonical)?;
        if major > MAX_MAJOR {
            return Err(ParseError::OutOfRange {
                field: "major",
                value: major,
            });
        }
        if minor > MAX_MINOR {
            return Err(ParseError::OutOfRange {
                field: "minor",
                value: minor,
            });
        }
        Ok(Self {
            major,
            minor,
            diskseq,
        })
    }
}

impl FromStr for PhysicalDevice {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        Self::parse(s.as_bytes())
    }
}

impl fmt::Display for PhysicalDevice {
    /// `major:minor` or `diskseq@major:minor`, lower-case hex, no leading zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.diskseq {
            Some(seq) if seq != 0 => write!(f, "{seq:x}@{:x}:{:x}", self.major, self.minor),
            _ => write!(f, "{:x}:{:x}", self.major, self.minor),
        }
    }
}

/// Parses a diskseq: the `diskseq` node's value and the part before `@` in `physical-device`.
/// Lower-case hex, 1 to 16 digits, no leading zero, not 0.
///
/// # Errors
/// [`ParseError`] saying what is wrong.
pub fn parse_diskseq(value: &[u8]) -> Result<u64, ParseError> {
    if value.is_empty() {
        return Err(ParseError::NotHex { field: "diskseq" });
    }
    if value.len() > MAX_DISKSEQ_DIGITS {
        return Err(ParseError::TooLong {
            field: "diskseq",
            max: MAX_DISKSEQ_DIGITS,
        });
    }
    if value.first() == Some(&b'0') {
        return Err(if value.len() == 1 {
            ParseError::ZeroDiskseq
        } else {
            ParseError::LeadingZero { field: "diskseq" }
        });
    }
    let mut seq = 0u64;
    for &b in value {
        // 16 digits at most, so the shifts cannot overflow.
        seq = (seq << 4)
            | u64::from(hex_digit(b, false).ok_or(ParseError::NotHex { field: "diskseq" })?);
    }
    Ok(seq)
}

/// Formats a diskseq for the [`DISKSEQ`] node: lower-case hex, no leading zero.
#[must_use]
pub fn format_diskseq(seq: u64) -> String {
    format!("{seq:x}")
}

/// A major or minor number; `canonical`: lower-case only, no leading zero.
fn parse_number(value: &[u8], field: &'static str, canonical: bool) -> Result<u32, ParseError> {
    if value.is_empty() {
        return Err(ParseError::NotHex { field });
    }
    if canonical && value.len() > 1 && value[0] == b'0' {
        return Err(ParseError::LeadingZero { field });
    }
    if value.len() > MAX_NUMBER_DIGITS {
        return Err(ParseError::TooLong {
            field,
            max: MAX_NUMBER_DIGITS,
        });
    }
    let mut n = 0u32;
    for &b in value {
        // 8 digits at most, so the shifts cannot overflow.
        n = (n << 4) | u32::from(hex_digit(b, !canonical).ok_or(ParseError::NotHex { field })?);
    }
    Ok(n)
}

fn hex_digit(b: u8, upper_case_ok: bool) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' if upper_case_ok => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Each input is refused with its error.
    fn assert_refused(cases: &[(&[u8], ParseError)]) {
        for (input, want) in cases {
            assert_eq!(
                PhysicalDevice::parse(input).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    pub(in crate::handoff) fn pd(major: u32, minor: u32, diskseq: Option<u64>) -> PhysicalDevice {
        PhysicalDevice {
            major,
            minor,
            diskseq,
        }
    }

    #[test]
    fn parses_plain_form() {
        assert_eq!(PhysicalDevice::parse(b"7:3"), Ok(pd(7, 3, None)));
        assert_eq!(PhysicalDevice::parse(b"fd:1a"), Ok(pd(0xfd, 0x1a, None)));
        assert_eq!(PhysicalDevice::parse(b"FD:1A"), Ok(pd(0xfd, 0x1a, None)));
        // sscanf("%x") accepts leading zeros, so do we (within 8 digits).
        assert_eq!(
            PhysicalDevice::parse(b"00000008:00000010"),
            Ok(pd(8, 0x10, None))
        );
        assert_eq!(
            PhysicalDevice::parse(b"fff:fffff"),
            Ok(pd(MAX_MAJOR, MAX_MINOR, None))
        );
        assert_eq!(PhysicalDevice::parse(b"0:0"), Ok(pd(0, 0, None)));
    }

    #[test]
    fn parses_diskseq_form() {
        assert_eq!(PhysicalDevice::parse(b"1f@7:3"), Ok(pd(7, 3, Some(0x1f))));
        assert_eq!(
            PhysicalDevice::parse(b"ffffffffffffffff@103:0"),
            Ok(pd(0x103, 0, Some(u64::MAX)))
        );
        assert_eq!("ab@8:0".parse(), Ok(pd(8, 0, Some(0xab))));
        assert_eq!("1@0:0".parse(), Ok(pd(0, 0, Some(1))));
    }

    #[test]
    fn refuses_what_sscanf_would_accept() {
        use ParseError::*;
        let cases: &[(&[u8], ParseError)] = &[
            (b"", Empty),
            (b"7", MissingColon),
            (b":3", NotHex { field: "major" }),
            (b"7:", NotHex { field: "minor" }),
            (b" 7:3", NotHex { field: "major" }),
            (b"7: 3", NotHex { field: "minor" }),
            (b"7:3 ", NotHex { field: "minor" }),
            (b"7:3\n", NotHex { field: "minor" }),
            (b"7:3\0", NotHex { field: "minor" }),
            (b"+7:3", NotHex { field: "major" }),
            (b"-7:3", NotHex { field: "major" }),
            (b"0x7:3", NotHex { field: "major" }),
            (b"7:3:1", NotHex { field: "minor" }),
            (b"7:3x", NotHex { field: "minor" }),
            (b"g:3", NotHex { field: "major" }),
            (
                b"000000007:3",
                TooLong {
                    field: "major",
                    max: 8,
                },
            ),
            (
                b"7:000000003",
                TooLong {
                    field: "minor",
                    max: 8,
                },
            ),
            (
                b"1000:0",
                OutOfRange {
                    field: "major",
                    value: 0x1000,
                },
            ),
            (
                b"7:100000",
                OutOfRange {
                    field: "minor",
                    value: 0x10_0000,
                },
            ),
            (
                b"ffffffff:0",
                OutOfRange {
                    field: "major",
                    value: u32::MAX,
                },
            ),
        ];
        assert_refused(cases);
    }

    #[test]
    fn refuses_bad_diskseq_forms() {
        use ParseError::*;
        let cases: &[(&[u8], ParseError)] = &[
            (b"@7:3", NotHex { field: "diskseq" }),
            (b"0@7:3", ZeroDiskseq),
            (b"01@7:3", LeadingZero { field: "diskseq" }),
            (b"00@7:3", LeadingZero { field: "diskseq" }),
            (
                b"10000000000000000@7:3",
                TooLong {
                    field: "diskseq",
                    max: 16,
                },
            ),
            (b"1@@7:3", NotHex { field: "major" }),
            (b"1@2@7:3", NotHex { field: "major" }),
            (b"x@7:3", NotHex { field: "diskseq" }),
            (b"-1@7:3", NotHex { field: "diskseq" }),
            (b"1 @7:3", NotHex { field: "diskseq" }),
            (b"1@7", MissingColon),
            (
                b"1@1000:3",
                OutOfRange {
                    field: "major",
                    value: 0x1000,
                },
            ),
            // The diskseq@ form is canonical, as the series' blkback wants it.
            (b"Ab@8:0", NotHex { field: "diskseq" }),
            (b"1@FD:0", NotHex { field: "major" }),
            (b"1@fd:1A", NotHex { field: "minor" }),
            (b"1@08:0", LeadingZero { field: "major" }),
            (b"1@8:00", LeadingZero { field: "minor" }),
        ];
        assert_refused(cases);
    }

    #[test]
    fn diskseq_node() {
        assert_eq!(parse_diskseq(b"1"), Ok(1));
        assert_eq!(parse_diskseq(b"a3f"), Ok(0xa3f));
        assert_eq!(
            parse_diskseq(b"A3F"),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"ffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(
            parse_diskseq(b""),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"0"), Err(ParseError::ZeroDiskseq));
        assert_eq!(
            parse_diskseq(b"012"),
            Err(ParseError::LeadingZero { field: "diskseq" })
        );
        assert_eq!(
            parse_diskseq(b"12\n"),
            Err(ParseError::NotHex { field: "diskseq" })
        );
        assert_eq!(parse_diskseq(b"18"), Ok(0x18), "hex, not decimal");
        assert_eq!(
            parse_diskseq(b"1ffffffffffffffff"),
            Err(ParseError::TooLong {
                field: "diskseq",
                max: 16
            })
        );
        assert_eq!(format_diskseq(0x2a), "2a");
        assert_eq!(format_diskseq(u64::MAX), "ffffffffffffffff");
    }

    #[test]
    fn format_round_trips() {
        for dev in [
            pd(7, 3, None),
            pd(0xfff, 0xfffff, Some(u64::MAX)),
            pd(0, 1, Some(1)),
        ] {
            let text = dev.to_string();
            assert_eq!(PhysicalDevice::parse(text.as_bytes()), Ok(dev), "{text}");
        }
        assert_eq!(pd(0xfd, 0x10, Some(0x2a)).to_string(), "2a@fd:10");
        assert_eq!(pd(0xfd, 0x10, Some(0)).to_string(), "fd:10");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_canonical_alphabet(input in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Ok(dev) = PhysicalDevice::parse(&input) {
                proptest::prop_assert!(input.iter().all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'@'));
                // What was accepted means the same after formatting.
                proptest::prop_assert_eq!(PhysicalDevice::parse(dev.to_string().as_bytes()), Ok(dev));
            }
        }

        #[test]
        fn format_then_parse_round_trips(major in 0..=MAX_MAJOR, minor in 0..=MAX_MINOR, seq in proptest::option::of(1..=u64::MAX)) {
            let dev = PhysicalDevice { major, minor, diskseq: seq };
            proptest::prop_assert_eq!(PhysicalDevice::parse(dev.to_string().as_bytes()), Ok(dev));
            if let Some(seq) = seq {
                proptest::prop_assert_eq!(parse_diskseq(format_diskseq(seq).as_bytes()), Ok(seq));
            }
        }
    }
}
