//! NBD URIs, after the NBD project's `doc/uri.md`: `nbd://host[:port]/export` for TCP (the
//! port defaults to 10809, IANA's NBD port) and `nbd+unix:///export?socket=PATH` for a Unix
//! socket (a `socket` starting with `%00` names an abstract socket). The export name is the
//! path without its first `/`, percent-decoded; it may be empty (the server's default
//! export).
//!
//! Only what this client can honour is accepted: TLS schemes (`nbds`, `nbds+unix`), TLS
//! query parameters and user information are errors, as is any query parameter the URI
//! document does not define (it says such parameters "SHOULD be diagnosed"), a host on a
//! `nbd+unix` URI, and a fragment. Every character outside RFC 3986's set must be
//! percent-encoded.
//!
//! ```
//! use nbd::uri::{Transport, Uri};
//!
//! let uri: Uri = "nbd://[::1]:10810/disk%201".parse().unwrap();
//! assert_eq!(uri.export(), "disk 1");
//! assert_eq!(uri.transport(), &Transport::Tcp { host: "::1".into(), port: 10810 });
//! assert_eq!(uri.to_string(), "nbd://[::1]:10810/disk%201");
//! ```

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv6Addr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

/// IANA's port for NBD, the port of an `nbd://` URI that names none.
pub const DEFAULT_PORT: u16 = 10809;
/// The longest URI accepted, in bytes.
pub const MAX_URI_LEN: usize = 8192;
/// The longest export name NBD allows, in bytes (proto.md: a string "MUST be no longer than
/// 4096 bytes").
pub const MAX_EXPORT_NAME_LEN: usize = 4096;
/// The longest Unix socket name, in bytes: `sun_path` holds 108 bytes, one of them the
/// path's terminating NUL (or an abstract name's leading one).
pub const MAX_SOCKET_LEN: usize = 107;

/// A parsed NBD URI: where the server is and which export to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    transport: Transport,
    export: String,
}

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP (`nbd://`).
    Tcp {
        /// A host name, an IPv4 address, or an IPv6 address without its brackets.
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix stream socket (`nbd+unix://`).
    Unix(UnixSocket),
}

/// The `socket` parameter of an `nbd+unix://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixSocket {
    /// A socket file (no NUL bytes, at most [`MAX_SOCKET_LEN`] bytes).
    Path(PathBuf),
    /// An abstract socket's name, without the leading NUL that marks it (`socket=%00name`).
    Abstract(Vec<u8>),
}

/// Why a string is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Longer than [`MAX_URI_LEN`].
    #[error("the URI is {0} bytes long, more than the {MAX_URI_LEN} accepted")]
    TooLong(usize),
    /// A character RFC 3986 does not allow unencoded (a space, a control character,
    /// anything outside ASCII, ...).
    #[error("character {character:?} at byte {position} must be percent-encoded")]
    InvalidCharacter {
        /// The character.
        character: char,
        /// Its byte offset in the URI.
        position: usize,
    },
    /// No `scheme://` at the start.
    #[error("not an NBD URI: expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH")]
    NotNbd,
    /// A scheme other than the NBD ones.
    #[error("unknown scheme {0:?}: expected nbd or nbd+unix")]
    UnknownScheme(String),
    /// `nbds` or `nbds+unix`: TLS, which this client does not speak.
    #[error("scheme {0:?} requires TLS, which this client does not support")]
    TlsScheme(String),
    /// A `tls-*` query parameter.
    #[error("query parameter {0:?} is for TLS, which this client does not support")]
    TlsParameter(String),
    /// `user@` in the authority: only used for TLS authentication.
    #[error(
        "user information (user@host) is only used for TLS, which this client does not support"
    )]
    UserInfo,
    /// `nbd://` without a host.
    #[error("an nbd:// URI needs a host")]
    MissingHost,
    /// A host that is neither a host name, an IPv4 address nor a bracketed IPv6 address.
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// A port that is not a number from 1 to 65535.
    #[error("invalid port {0:?}: expected a number from 1 to 65535")]
    InvalidPort(String),
    /// `nbd+unix://host/`: the socket is named by the `socket` parameter, never a host.
    #[error("an nbd+unix:// URI takes no host (the socket is its socket= parameter), found {0:?}")]
    UnixWithHost(String),
    /// `nbd+unix://` without `socket=`.
    #[error("an nbd+unix:// URI needs a socket=PATH query parameter")]
    MissingSocket,
    /// `socket=` with nothing after it.
    #[error("the socket parameter is empty")]
    EmptySocket,
    /// A socket name longer than a Unix socket address holds.
    #[error(
        "the socket name is {0} bytes, more than a Unix socket address holds ({MAX_SOCKET_LEN})"
    )]
    SocketTooLong(usize),
    /// A query parameter given twice.
    #[error("query parameter {0:?} is given twice")]
    DuplicateParameter(String),
    /// A query parameter this client does not know (only `socket`, and only for
    /// `nbd+unix://`).
    #[error("unknown query parameter {0:?} (only nbd+unix:// takes one: socket)")]
    UnknownParameter(String),
    /// A `#fragment`.
    #[error("an NBD URI has no fragment (#...)")]
    Fragment,
    /// `%` not followed by two hexadecimal digits.
    #[error("invalid percent-encoding in the {0}")]
    BadPercent(&'static str),
    /// A NUL byte where none may be (the export name, a socket path).
    #[error("the {0} contains a NUL byte")]
    Nul(&'static str),
    /// The export name is not UTF-8 once decoded.
    #[error("the export name is not valid UTF-8")]
    ExportNotUtf8,
    /// The export name is longer than NBD allows.
    #[error("the export name is {0} bytes, more than NBD allows ({MAX_EXPORT_NAME_LEN})")]
    ExportTooLong(usize),
}

impl Uri {
    /// Parses an NBD URI.
    ///
    /// # Errors
    /// A [`UriError`] naming the first thing wrong.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if s.len() > MAX_URI_LEN {
            return Err(UriError::TooLong(s.len()));
        }
        if let Some((position, character)) = s.char_indices().find(|&(_, c)| !uri_char(c)) {
            return Err(UriError::InvalidCharacter {
                character,
                position,
            });
        }
        // From here on `s` is ASCII, so every byte index is a char boundary.
        let (scheme, rest) = s.split_once("://").ok_or(UriError::NotNbd)?;
        let scheme_char = |c: char| c.is_ascii_alphanumeric() || "+-.".contains(c);
        if scheme.is_empty() || !scheme.chars().all(scheme_char) {
            return Err(UriError::NotNbd);
        }
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => return Err(UriError::TlsScheme(scheme.to_owned())),
            _ => return Err(UriError::UnknownScheme(scheme.to_owned())),
        };
        if rest.contains('#') {
            return Err(UriError::Fragment);
        }
        let (hier, query) = match rest.split_once('?') {
            Some((hier, query)) => (hier, query),
            None => (rest, ""),
        };
        let (authority, path) = hier.split_at(hier.find('/').unwrap_or(hier.len()));
        let export = parse_export(path.strip_prefix('/').unwrap_or(path))?;
        let params = parse_query(query)?;
        let transport = if unix {
            if !authority.is_empty() {
                return Err(UriError::UnixWithHost(authority.to_owned()));
            }
            let mut socket = None;
            for (key, value) in params {
                match key.as_str() {
                    "socket" if socket.is_some() => return Err(UriError::DuplicateParameter(key)),
                    "socket" => socket = Some(value),
                    _ => return Err(unknown_parameter(key)),
                }
            }
            Transport::Unix(parse_socket(socket.ok_or(UriError::MissingSocket)?)?)
        } else {
            if let Some((key, _)) = params.into_iter().next() {
                return Err(unknown_parameter(key));
            }
            let (host, port) = parse_authority(authority)?;
            Transport::Tcp { host, port }
        };
        Ok(Self { transport, export })
    }

    /// Where the server is.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The export name to ask the server for (empty: the server's default export).
    pub fn export(&self) -> &str {
        &self.export
    }
}

impl FromStr for Uri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        Self::parse(s)
    }
}

/// Writes the URI back in its canonical form (what [`Uri::parse`] reads back to an equal
/// value): the default port written out, everything but unreserved characters (and `/` in the
/// export name and socket path) percent-encoded.
impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/")?
            }
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/")?,
            Transport::Unix(_) => f.write_str("nbd+unix:///")?,
        }
        encode(f, self.export.as_bytes())?;
        match &self.transport {
            Transport::Tcp { .. } => Ok(()),
            Transport::Unix(UnixSocket::Path(path)) => {
                f.write_str("?socket=")?;
                encode(f, path.as_os_str().as_bytes())
            }
            Transport::Unix(UnixSocket::Abstract(name)) => {
                f.write_str("?socket=%00")?;
                encode(f, name)
            }
        }
    }
}

/// Whether RFC 3986 allows `c` somewhere in a URI unencoded (unreserved, reserved, `%`).
fn uri_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c)
}

/// Percent-encodes `bytes`, leaving unreserved characters and `/` as they are.
fn encode(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            write!(f, "{}", char::from(b))?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

/// Decodes `%XX` sequences; `what` names the component in the error.
fn decode(s: &str, what: &'static str) -> Result<Vec<u8>, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(UriError::BadPercent(what))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

fn parse_export(path: &str) -> Result<String, UriError> {
    let bytes = decode(path, "export name")?;
    if bytes.len() > MAX_EXPORT_NAME_LEN {
        return Err(UriError::ExportTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(UriError::Nul("export name"));
    }
    String::from_utf8(bytes).map_err(|_| UriError::ExportNotUtf8)
}

/// The query's `key=value` pairs, keys decoded to UTF-8 (lossily: a key that is not UTF-8 is
/// unknown anyway), values left as bytes; empty pairs (`a&&b`) are skipped.
fn parse_query(query: &str) -> Result<Vec<(String, Vec<u8>)>, UriError> {
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = String::from_utf8_lossy(&decode(key, "query")?).into_owned();
        params.push((key, decode(value, "query")?));
    }
    Ok(params)
}

fn unknown_parameter(key: String) -> UriError {
    if key.starts_with("tls-") {
        UriError::TlsParameter(key)
    } else {
        UriError::UnknownParameter(key)
    }
}

fn parse_socket(value: Vec<u8>) -> Result<UnixSocket, UriError> {
    if let Some(name) = value.strip_prefix(&[0]) {
        return match name.len() {
            0 => Err(UriError::EmptySocket),
            len if len > MAX_SOCKET_LEN => Err(UriError::SocketTooLong(len)),
            _ => Ok(UnixSocket::Abstract(name.to_vec())),
        };
    }
    if value.is_empty() {
        return Err(UriError::EmptySocket);
    }
    if value.len() > MAX_SOCKET_LEN {
        return Err(UriError::SocketTooLong(value.len()));
    }
    if value.contains(&0) {
        return Err(UriError::Nul("socket path"));
    }
    Ok(UnixSocket::Path(PathBuf::from(OsString::from_vec(value))))
}

fn parse_authority(authority: &str) -> Result<(String, u16), UriError> {
    if authority.contains('@') {
        return Err(UriError::UserInfo);
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (inside, after) = bracketed
            .split_once(']')
            .ok_or_else(|| UriError::InvalidHost(authority.to_owned()))?;
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(UriError::InvalidHost(authority.to_owned()));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| UriError::InvalidHost(authority.to_owned()))?,
            ),
        };
        (inside, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UriError::MissingHost);
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || "-._~:".contains(c);
    if !host.chars().all(name_char) {
        return Err(UriError::InvalidHost(host.to_owned()));
    }
    let port = match port {
        // RFC 3986 allows an empty port: the scheme's default.
        None | Some("") => DEFAULT_PORT,
        Some(digits) if digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) => digits
            .parse::<u16>()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| UriError::InvalidPort(digits.to_owned()))?,
        Some(p) => return Err(UriError::InvalidPort(p.to_owned())),
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(host: &str, port: u16, export: &str) -> Uri {
        Uri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    fn unix(path: &str, export: &str) -> Uri {
        Uri {
            transport: Transport::Unix(UnixSocket::Path(path.into())),
            export: export.into(),
        }
    }

    #[test]
    fn the_uri_documents_examples() {
        // doc/uri.md's table of export names.
        for (s, export) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ] {
            assert_eq!(Uri::parse(s), Ok(tcp("example.com", 10809, export)), "{s}");
        }
        assert_eq!(
            Uri::parse("nbd+unix:///disk?socket=sock"),
            Ok(unix("sock", "disk"))
        );
        assert_eq!(
            Uri::parse("nbd+unix:///?socket=%00/abstract"),
            Ok(Uri {
                transport: Transport::Unix(UnixSocket::Abstract(b"/abstract".to_vec())),
                export: String::new(),
            })
        );
    }

    #[test]
    fn hosts_and_ports() {
        assert_eq!(
            Uri::parse("nbd://127.0.0.1:10810/x"),
            Ok(tcp("127.0.0.1", 10810, "x"))
        );
        assert_eq!(Uri::parse("nbd://[::1]/x"), Ok(tcp("::1", 10809, "x")));
        assert_eq!(Uri::parse("nbd://[fe80::1]:1/"), Ok(tcp("fe80::1", 1, "")));
        assert_eq!(Uri::parse("nbd://h:/"), Ok(tcp("h", 10809, "")));
        assert_eq!(Uri::parse("NBD://h:65535"), Ok(tcp("h", 65535, "")));
        assert_eq!(
            Uri::parse("nbd+unix:///a%2Fb?socket=/run/q%20sd.sock&"),
            Ok(unix("/run/q sd.sock", "a/b"))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        use UriError as E;
        let cases: &[(&str, UriError)] = &[
            ("", E::NotNbd),
            ("://x", E::NotNbd),
            ("nbd:/x", E::NotNbd),
            ("http://h/x", E::UnknownScheme("http".into())),
            ("nbds://h/x", E::TlsScheme("nbds".into())),
            ("nbds+unix:///x?socket=s", E::TlsScheme("nbds+unix".into())),
            (
                "nbd://h/x?tls-type=x509",
                E::TlsParameter("tls-type".into()),
            ),
            ("nbd://h/x?socket=s", E::UnknownParameter("socket".into())),
            (
                "nbd+unix:///x?socket=s&x-foo=1",
                E::UnknownParameter("x-foo".into()),
            ),
            (
                "nbd+unix:///x?socket=a&socket=b",
                E::DuplicateParameter("socket".into()),
            ),
            ("nbd+unix:///x", E::MissingSocket),
            ("nbd+unix:///x?socket=", E::EmptySocket),
            ("nbd+unix:///x?socket=%00", E::EmptySocket),
            ("nbd+unix:///x?socket=a%00b", E::Nul("socket path")),
            ("nbd+unix://h/x?socket=s", E::UnixWithHost("h".into())),
            ("nbd://u@h/x", E::UserInfo),
            ("nbd:///x", E::MissingHost),
            ("nbd://:10809/x", E::MissingHost),
            ("nbd://h:0/x", E::InvalidPort("0".into())),
            ("nbd://h:65536/x", E::InvalidPort("65536".into())),
            ("nbd://h:-1/x", E::InvalidPort("-1".into())),
            (
                "nbd://h:99999999999999999999/x",
                E::InvalidPort("99999999999999999999".into()),
            ),
            ("nbd://h:1:2/x", E::InvalidPort("1:2".into())),
            ("nbd://[::1/x", E::InvalidHost("[::1".into())),
            ("nbd://[zz]/x", E::InvalidHost("[zz]".into())),
            ("nbd://[::1]x/x", E::InvalidHost("[::1]x".into())),
            ("nbd://h%41/x", E::InvalidHost("h%41".into())),
            ("nbd://h!/x", E::InvalidHost("h!".into())),
            ("nbd://h/x#frag", E::Fragment),
            ("nbd://h/x%", E::BadPercent("export name")),
            ("nbd://h/x%4", E::BadPercent("export name")),
            ("nbd://h/x%zz", E::BadPercent("export name")),
            ("nbd://h/x%+1", E::BadPercent("export name")),
            ("nbd://h/x%00", E::Nul("export name")),
            ("nbd://h/%ff", E::ExportNotUtf8),
            ("nbd+unix:///?socket=%4", E::BadPercent("query")),
            (
                "nbd://h/a b",
                E::InvalidCharacter {
                    character: ' ',
                    position: 9,
                },
            ),
            (
                "nbd://h/é",
                E::InvalidCharacter {
                    character: 'é',
                    position: 8,
                },
            ),
            (
                "nbd://h/\n",
                E::InvalidCharacter {
                    character: '\n',
                    position: 8,
                },
            ),
        ];
        for (s, err) in cases {
            assert_eq!(Uri::parse(s).as_ref(), Err(err), "{s:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn lengths_are_bounded() {
        let long = format!("nbd://h/{}", "a".repeat(MAX_URI_LEN));
        assert_eq!(Uri::parse(&long), Err(UriError::TooLong(long.len())));
        let export = format!("nbd://h/{}", "a".repeat(MAX_EXPORT_NAME_LEN + 1));
        assert_eq!(
            Uri::parse(&export),
            Err(UriError::ExportTooLong(MAX_EXPORT_NAME_LEN + 1))
        );
        let ok = format!("nbd://h/{}", "a".repeat(MAX_EXPORT_NAME_LEN));
        assert!(Uri::parse(&ok).is_ok());
        let socket = "s".repeat(MAX_SOCKET_LEN + 1);
        assert_eq!(
            Uri::parse(&format!("nbd+unix:///?socket={socket}")),
            Err(UriError::SocketTooLong(MAX_SOCKET_LEN + 1))
        );
        assert_eq!(
            Uri::parse(&format!("nbd+unix:///?socket=%00{socket}")),
            Err(UriError::SocketTooLong(MAX_SOCKET_LEN + 1))
        );
        let socket = "s".repeat(MAX_SOCKET_LEN);
        assert!(Uri::parse(&format!("nbd+unix:///?socket={socket}")).is_ok());
    }

    fn any_uri() -> impl Strategy<Value = Uri> {
        let export =
            proptest::collection::vec(any::<char>().prop_filter("NUL", |&c| c != '\0'), 0..40)
                .prop_map(|c| c.into_iter().collect::<String>());
        let host = prop_oneof![
            "[a-z0-9][a-z0-9.-]{0,20}",
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<Ipv6Addr>().prop_map(|a| a.to_string()),
        ];
        let tcp = (host, 1u16..=u16::MAX).prop_map(|(host, port)| Transport::Tcp { host, port });
        let path = proptest::collection::vec(1u8..=u8::MAX, 1..=MAX_SOCKET_LEN)
            .prop_map(|p| UnixSocket::Path(PathBuf::from(OsString::from_vec(p))));
        let abstract_ = proptest::collection::vec(any::<u8>(), 1..=MAX_SOCKET_LEN)
            .prop_map(UnixSocket::Abstract);
        let transport = prop_oneof![
            tcp,
            path.prop_map(Transport::Unix),
            abstract_.prop_map(Transport::Unix)
        ];
        (transport, export).prop_map(|(transport, export)| Uri { transport, export })
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = Uri::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_uri_like_strings(
            s in "(nbd|nbd\\+unix|nbds|x)?(://)?[a-z0-9\\[\\]:@%./?&=#-]{0,60}"
        ) {
            if let Ok(uri) = Uri::parse(&s) {
                // Whatever parses, prints to a URI that parses to the same thing.
                prop_assert_eq!(Uri::parse(&uri.to_string()), Ok(uri));
            }
        }

        #[test]
        fn display_round_trips(uri in any_uri()) {
            prop_assert_eq!(Uri::parse(&uri.to_string()), Ok(uri));
        }
    }
}
