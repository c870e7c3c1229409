//! Node permissions: a list of `<letter><domid>` entries (`n0`, `r5`, `w5`, `b5`). The first
//! entry names the owner and, by its letter, what every domain not listed may do.

use std::fmt;

use crate::DomId;

use super::XsError;

/// What a permission entry allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermAccess {
    /// `n`: nothing.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: both read and write.
    Both,
}

impl PermAccess {
    /// Whether this allows reading.
    pub fn can_read(self) -> bool {
        matches!(self, Self::Read | Self::Both)
    }

    /// Whether this allows writing.
    pub fn can_write(self) -> bool {
        matches!(self, Self::Write | Self::Both)
    }

    fn letter(self) -> char {
        match self {
            Self::None => 'n',
            Self::Read => 'r',
            Self::Write => 'w',
            Self::Both => 'b',
        }
    }
}

/// One permission entry. In a node's list the first entry's domain owns the node and its
/// access applies to domains not listed; later entries grant access to one domain each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain.
    pub domid: DomId,
    /// What it may do.
    pub access: PermAccess,
}

impl Perm {
    /// An entry.
    pub fn new(domid: DomId, access: PermAccess) -> Self {
        Self { domid, access }
    }

    /// Parses one entry such as `r5`. Strict: one letter of `nrwb` then a decimal domid
    /// that fits 16 bits, nothing else.
    ///
    /// # Errors
    /// [`XsError::Invalid`] for anything else.
    pub fn parse(s: &[u8]) -> Result<Self, XsError> {
        let (&letter, digits) = s.split_first().ok_or(XsError::Invalid)?;
        let access = match letter {
            b'n' => PermAccess::None,
            b'r' => PermAccess::Read,
            b'w' => PermAccess::Write,
            b'b' => PermAccess::Both,
            _ => return Err(XsError::Invalid),
        };
        if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(XsError::Invalid);
        }
        let domid = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<DomId>().ok())
            .ok_or(XsError::Invalid)?;
        Ok(Self { domid, access })
    }

    /// Parses a permission payload: NUL-separated entries, at least one.
    ///
    /// # Errors
    /// [`XsError::Invalid`] for an empty list or a malformed entry.
    pub fn parse_list(payload: &[u8]) -> Result<Vec<Self>, XsError> {
        let perms = super::wire::split_strings(payload)
            .into_iter()
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if perms.is_empty() {
            return Err(XsError::Invalid);
        }
        Ok(perms)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        for s in ["n0", "r5", "w65535", "b7"] {
            assert_eq!(Perm::parse(s.as_bytes()).unwrap().to_string(), s);
        }
        for bad in [
            "", "x1", "r", "r-1", "r65536", "r1a", "R1", "r 1", "r000001",
        ] {
            assert!(Perm::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            Perm::parse_list(b"b0\0r5\0").unwrap(),
            vec![
                Perm::new(0, PermAccess::Both),
                Perm::new(5, PermAccess::Read)
            ]
        );
        assert!(Perm::parse_list(b"").is_err());
    }
}
