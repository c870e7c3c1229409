//! The trace format: one JSON object per line, each with a `"t"` tag naming the event.
//! `docs/trace-format.md` describes it for people writing traces by hand.

use serde::{Deserialize, Serialize};

/// Version written in the `trace` header line.
pub const VERSION: u32 = 1;

/// Whether the grantee may write a granted page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantAccess {
    /// Read-write.
    #[default]
    Rw,
    /// Read-only.
    Ro,
}

/// What the disk held before the trace started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initial {
    /// All zeros (a fresh sparse image): data read is compared.
    #[default]
    Zero,
    /// Not known to the recorder (a live disk): data read is only compared when the replay
    /// is given the same image.
    Unknown,
    /// What the trace named by the disk's `after` (a file in the same directory) left: the
    /// guest's next boot, a new domain on the same disk. Data read is compared.
    After,
}

/// How the queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitKind {
    /// Stopped by the control plane (normal teardown).
    Stopped,
    /// The frontend broke the ring protocol: the ring was halted.
    Protocol,
    /// A local failure.
    Failed,
}

/// Grant mode of the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Grant copy into bounce buffers.
    #[default]
    Copy,
    /// Grant map (with persistent grants when `persistent`).
    Map,
}

fn default_true() -> bool {
    true
}
fn default_sector_size() -> u32 {
    512
}
fn default_indirect() -> u16 {
    256
}
fn one() -> u32 {
    1
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Header: format version and what the trace is about.
    Trace {
        /// [`VERSION`].
        version: u32,
        /// What the trace does and, for a hostile trace, what the backend must do.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        about: String,
    },
    /// A comment.
    Note {
        /// Free text.
        text: String,
    },
    /// The disk, before any queue.
    Disk {
        /// Size in 512-byte sectors.
        sectors: u64,
        /// Logical block size.
        #[serde(default = "default_sector_size")]
        sector_size: u32,
        /// The vbd is read-only.
        #[serde(default, skip_serializing_if = "is_false")]
        read_only: bool,
        /// What it held before.
        #[serde(default)]
        initial: Initial,
        /// With `initial: after`: the file name of the trace this one follows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// A queue connects: the negotiated ring and features.
    Queue {
        /// Queue index.
        q: u32,
        /// The `protocol` string (`x86_64-abi`, `x86_32-abi`).
        abi: String,
        /// Grant refs of the ring pages (1, 2, 4, 8 or 16).
        ring_refs: Vec<u32>,
        /// Grant copy or grant map.
        #[serde(default)]
        mode: Mode,
        /// Persistent grants negotiated.
        #[serde(default, skip_serializing_if = "is_false")]
        persistent: bool,
        /// `feature-max-indirect-segments` advertised.
        #[serde(default = "default_indirect")]
        max_indirect_segments: u16,
        /// `feature-flush-cache`.
        #[serde(default = "default_true")]
        flush: bool,
        /// `feature-barrier`.
        #[serde(default = "default_true")]
        barrier: bool,
        /// `feature-discard`.
        #[serde(default = "default_true")]
        discard: bool,
    },
    /// The frontend grants page `ref` to the backend with this content.
    Grant {
        /// The grant reference.
        #[serde(rename = "ref")]
        gref: u32,
        /// Access.
        #[serde(default)]
        access: GrantAccess,
        /// Content: bytes from offset 0 in hex, the rest of the page zero.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hex: Option<String>,
        /// Or: the deterministic pattern of this seed (`sim::workload::pattern_page`). Neither: zeros.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<u64>,
    },
    /// The frontend ends access to `ref`.
    Ungrant {
        /// The grant reference.
        #[serde(rename = "ref")]
        gref: u32,
    },
    /// One request slot, raw bytes in hex (the ABI's request size).
    Slot {
        /// Queue.
        q: u32,
        /// The slot bytes.
        hex: String,
        /// Publish `req_prod` (and notify if `req_event` asks) right away.
        #[serde(default = "default_true")]
        push: bool,
    },
    /// Publish queued slots and notify if the backend asked.
    Push {
        /// Queue.
        q: u32,
    },
    /// Write `req_prod` directly (a hostile frontend).
    ReqProd {
        /// Queue.
        q: u32,
        /// The value, counted from the ring's start (0).
        value: u32,
    },
    /// Notify the backend's event channel `count` times, whatever `req_event` says.
    Kick {
        /// Queue.
        q: u32,
        /// How many notifications.
        #[serde(default = "one")]
        count: u32,
    },
    /// The backend woke up for an event (recorded; nothing to replay).
    Event {
        /// Queue.
        q: u32,
    },
    /// A response the backend must give (waited for, in any order among responses).
    Rsp {
        /// Queue.
        q: u32,
        /// Request id.
        id: u64,
        /// Operation echoed.
        op: u8,
        /// Status (0 okay, -1 error, -2 not supported).
        status: i16,
        /// For successful reads: the data read, segment by segment, in hex with its trailing
        /// zeros left out (`page_hex`; the replay pads it to the read's length), compared
        /// byte for byte. What the recorder writes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        /// For successful reads, instead of `data`: FNV-1a 64 of the data read, segment by
        /// segment, in hex (generated traces whose large reads of pattern data would
        /// otherwise weigh megabytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sum: Option<String>,
    },
    /// No response may arrive on any queue for `ms` milliseconds.
    Quiet {
        /// Milliseconds.
        ms: u64,
    },
    /// Pause the frontend.
    Sleep {
        /// Milliseconds.
        ms: u64,
    },
    /// The frontend disconnects queue `q` with requests possibly in flight and reconnects
    /// (the backend's queue is stopped, the ring reinitialised and a new queue started).
    Reconnect {
        /// Queue.
        q: u32,
    },
    /// The queue ended (and how). `protocol` is waited for; `stopped` is what every queue
    /// left at the end of the trace must give.
    Exit {
        /// Queue.
        q: u32,
        /// How.
        how: ExitKind,
        /// The backend's reason, for people (not compared).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
}

impl Event {
    /// One line of JSON.
    pub fn to_line(&self) -> String {
        // Serialising these plain types cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Parses a trace: one event per non-empty line; lines starting with `#` are comments.
///
/// # Errors
/// The first line that is not a valid event, with its number (1-based).
pub fn parse(text: &str) -> Result<Vec<(usize, Event)>, (usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|e| (i + 1, e))
                .map_err(|e| (i + 1, e.to_string()))
        })
        .collect()
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(D[usize::from(b >> 4)]));
        s.push(char::from(D[usize::from(b & 15)]));
    }
    s
}

/// Parses hex (either case, no separators).
///
/// # Errors
/// An odd length or a non-hex digit.
pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(format!("odd hex length {}", b.len()));
    }
    let digit = |c: u8| -> Result<u8, String> {
        char::from(c)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("bad hex digit {:?}", char::from(c)))
    };
    b.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Hex of bytes (a page, data read) with their trailing zeros left out (the format pads
/// with zeros).
pub fn page_hex(page: &[u8]) -> String {
    let end = page.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    to_hex(&page[..end])
}

/// FNV-1a 64, the checksum of data read.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The checksum as the trace writes it.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let evs = [
            Event::Grant {
                gref: 9,
                access: GrantAccess::Ro,
                hex: Some("00ff".into()),
                pattern: None,
            },
            Event::Slot {
                q: 0,
                hex: "0001".into(),
                push: false,
            },
            Event::Rsp {
                q: 1,
                id: 7,
                op: 0,
                status: -1,
                data: Some("00ff".into()),
                sum: None,
            },
            Event::Exit {
                q: 0,
                how: ExitKind::Protocol,
                detail: String::new(),
            },
        ];
        let text: String = evs.iter().map(|e| e.to_line() + "\n").collect();
        assert!(
            text.contains(r#""t":"grant","ref":9,"access":"ro","hex":"00ff""#),
            "{text}"
        );
        let back: Vec<Event> = parse(&text).unwrap().into_iter().map(|(_, e)| e).collect();
        assert_eq!(back, evs);
    }

    #[test]
    fn parse_reports_the_bad_line() {
        let err = parse("{\"t\":\"sleep\",\"ms\":1}\n\n{\"t\":\"sleep\"}\n").unwrap_err();
        assert_eq!(err.0, 3);
        assert!(parse(r#"{"t":"sleep","ms":1,"extra":2}"#).is_err());
    }

    #[test]
    fn hex_and_checksum() {
        assert_eq!(from_hex(&to_hex(&[0, 1, 0xab])).unwrap(), vec![0, 1, 0xab]);
        assert!(from_hex("abc").is_err() && from_hex("zz").is_err());
        assert_eq!(page_hex(&[1, 0, 2, 0, 0]), "010002");
        assert_eq!(page_hex(&[0; 8]), "");
        // FNV-1a 64 of "a" (published test vector).
        let mut f = Fnv::default();
        f.update(b"a");
        assert_eq!(f.hex(), "af63dc4c8601ec8c");
    }
}
