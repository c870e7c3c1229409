//! The XenStore wire format (`xen/include/public/io/xs_wire.h`), shared by the client and the
//! simulated xenstored so both speak exactly the same bytes.
//!
//! A message is a 16-byte header `{u32 type, u32 req_id, u32 tx_id, u32 len}` in host byte
//! order, followed by `len` payload bytes. Strings in a payload are NUL-terminated; a WRITE
//! carries `path\0` followed by the raw value (no terminator).

/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload either side may send.
pub const PAYLOAD_MAX: usize = 4096;
/// The largest payload `/dev/xen/xenbus` accepts: Linux's `xenbus_file_write` buffers the
/// header and the payload together in `XENSTORE_PAYLOAD_MAX` bytes, leaving 4080 for the payload.
pub const XENBUS_DEV_PAYLOAD_MAX: usize = PAYLOAD_MAX - HEADER_LEN;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest relative path.
pub const REL_PATH_MAX: usize = 2048;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// XS_CONTROL (XS_DEBUG).
    Control = 0,
    /// XS_DIRECTORY: the children of a node.
    Directory = 1,
    /// XS_READ: a node's value.
    Read = 2,
    /// XS_GET_PERMS: a node's permission list.
    GetPerms = 3,
    /// XS_WATCH: register a watch.
    Watch = 4,
    /// XS_UNWATCH: remove a watch.
    Unwatch = 5,
    /// XS_TRANSACTION_START.
    TransactionStart = 6,
    /// XS_TRANSACTION_END ("T" commits, "F" aborts).
    TransactionEnd = 7,
    /// XS_INTRODUCE: a domain's store ring (toolstack only).
    Introduce = 8,
    /// XS_RELEASE: a domain is gone (toolstack only).
    Release = 9,
    /// XS_GET_DOMAIN_PATH: `/local/domain/<domid>`.
    GetDomainPath = 10,
    /// XS_WRITE.
    Write = 11,
    /// XS_MKDIR.
    Mkdir = 12,
    /// XS_RM: remove a node and its subtree.
    Rm = 13,
    /// XS_SET_PERMS.
    SetPerms = 14,
    /// XS_WATCH_EVENT: sent by xenstored when a watch fires.
    WatchEvent = 15,
    /// XS_ERROR: the reply carries an errno name such as `ENOENT`.
    Error = 16,
    /// XS_IS_DOMAIN_INTRODUCED.
    IsDomainIntroduced = 17,
    /// XS_RESUME.
    Resume = 18,
    /// XS_SET_TARGET.
    SetTarget = 19,
    /// XS_RESET_WATCHES.
    ResetWatches = 21,
    /// XS_DIRECTORY_PART: a directory listing in parts.
    DirectoryPart = 22,
}

impl MsgType {
    /// The type for a raw header value, `None` for values this protocol version lacks.
    pub fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Control,
            1 => Self::Directory,
            2 => Self::Read,
            3 => Self::GetPerms,
            4 => Self::Watch,
            5 => Self::Unwatch,
            6 => Self::TransactionStart,
            7 => Self::TransactionEnd,
            8 => Self::Introduce,
            9 => Self::Release,
            10 => Self::GetDomainPath,
            11 => Self::Write,
            12 => Self::Mkdir,
            13 => Self::Rm,
            14 => Self::SetPerms,
            15 => Self::WatchEvent,
            16 => Self::Error,
            17 => Self::IsDomainIntroduced,
            18 => Self::Resume,
            19 => Self::SetTarget,
            21 => Self::ResetWatches,
            22 => Self::DirectoryPart,
            _ => return None,
        })
    }
}

/// One message as read from the wire; `ty` stays raw so an unknown type can be answered or
/// reported rather than dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The raw message type.
    pub ty: u32,
    /// The request id, echoed in the reply.
    pub req_id: u32,
    /// The transaction id (0: none).
    pub tx_id: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// The message's type, if known.
    pub fn msg_type(&self) -> Option<MsgType> {
        MsgType::from_raw(self.ty)
    }

    /// Header and payload in one buffer, so a message is written with one `write`
    /// (`/dev/xen/xenbus` wants a message per write).
    pub fn encode(&self) -> Vec<u8> {
        encode(self.ty, self.req_id, self.tx_id, &self.payload)
    }
}

/// Header followed by payload, ready for one `write`. The caller bounds the payload length.
pub fn encode(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // A payload longer than u32::MAX cannot be sent; callers check PAYLOAD_MAX first, and the
    // saturation keeps a bug from truncating the length silently into a valid-looking frame.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    for field in [ty, req_id, tx_id, len] {
        out.extend_from_slice(&field.to_ne_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// A frame whose header announces more payload than allowed: the stream cannot be
/// resynchronised, so the connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message payload of {len} bytes exceeds the limit of {max}")]
pub struct OversizedFrame {
    /// The announced payload length.
    pub len: u32,
    /// The limit.
    pub max: usize,
}

/// Reassembles messages from a byte stream (a socket may split or merge them).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max_payload: usize,
}

impl FrameReader {
    /// A reader accepting payloads up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_payload,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether a partial message is buffered (an EOF now cuts a message short).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete message, if buffered.
    ///
    /// # Errors
    /// [`OversizedFrame`] when a header announces a payload over the limit.
    pub fn next_message(&mut self) -> Result<Option<Message>, OversizedFrame> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let field = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[i * 4..i * 4 + 4]);
            u32::from_ne_bytes(b)
        };
        let (ty, req_id, tx_id, len) = (field(0), field(1), field(2), field(3));
        let payload_len = usize::try_from(len).unwrap_or(usize::MAX);
        if payload_len > self.max_payload {
            return Err(OversizedFrame {
                len,
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + payload_len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Message {
            ty,
            req_id,
            tx_id,
            payload,
        }))
    }
}

/// Splits a payload of NUL-terminated strings; a final unterminated piece is kept, an empty
/// payload gives no strings.
pub fn split_strings(payload: &[u8]) -> Vec<&[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if payload.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0).collect()
}

/// `s` followed by a NUL.
pub fn nul_terminated(s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s);
    v.push(0);
    v
}

/// A reply string without its terminating NUL (xenstored sends one; tolerate its absence).
pub fn strip_nul(payload: &[u8]) -> &[u8] {
    payload.strip_suffix(&[0]).unwrap_or(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_merged() {
        let a = encode(MsgType::Read as u32, 7, 0, b"/a\0");
        let b = encode(MsgType::Write as u32, 8, 3, b"/b\0xy");
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let mut r = FrameReader::new(PAYLOAD_MAX);
        r.push(&all[..5]);
        assert_eq!(r.next_message(), Ok(None));
        r.push(&all[5..]);
        let m1 = r.next_message().unwrap().unwrap();
        assert_eq!(
            (m1.msg_type(), m1.req_id, m1.payload.as_slice()),
            (Some(MsgType::Read), 7, &b"/a\0"[..])
        );
        let m2 = r.next_message().unwrap().unwrap();
        assert_eq!(
            (m2.req_id, m2.tx_id, m2.payload.as_slice()),
            (8, 3, &b"/b\0xy"[..])
        );
        assert_eq!(r.next_message(), Ok(None));
        assert!(!r.has_partial());
    }

    proptest::proptest! {
        /// However a stream of messages is cut into reads, the same messages come out.
        #[test]
        fn any_split_reassembles(
            msgs in proptest::collection::vec(
                (0u32..30, proptest::prelude::any::<u32>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                0..8,
            ),
            cuts in proptest::collection::vec(1usize..200, 0..40),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, id, p)| encode(*t, *id, 0, p)).collect();
            let mut r = FrameReader::new(PAYLOAD_MAX);
            let mut out = Vec::new();
            let mut rest = stream.as_slice();
            for cut in cuts.into_iter().chain(std::iter::once(usize::MAX)) {
                let (now, later) = rest.split_at(cut.min(rest.len()));
                r.push(now);
                rest = later;
                while let Some(m) = r.next_message().unwrap() {
                    out.push((m.ty, m.req_id, m.payload));
                }
            }
            proptest::prop_assert_eq!(out, msgs);
            proptest::prop_assert!(!r.has_partial());
        }
    }

    #[test]
    fn oversized_header_rejected() {
        let mut r = FrameReader::new(PAYLOAD_MAX);
        let mut h = encode(MsgType::Read as u32, 1, 0, b"");
        h[12..16].copy_from_slice(&4097u32.to_ne_bytes());
        r.push(&h);
        assert_eq!(
            r.next_message(),
            Err(OversizedFrame {
                len: 4097,
                max: PAYLOAD_MAX
            })
        );
    }

    #[test]
    fn strings_split() {
        assert_eq!(split_strings(b"a\0bc\0"), vec![&b"a"[..], &b"bc"[..]]);
        assert_eq!(split_strings(b""), Vec::<&[u8]>::new());
        assert_eq!(split_strings(b"\0"), vec![&b""[..]]);
        assert_eq!(split_strings(b"a\0b"), vec![&b"a"[..], &b"b"[..]]);
    }
}
