//! Client behaviour specific to `/dev/xen/xenbus` and the wire protocol's corners, driven by
//! hand from the other end of a socketpair: the device does not exist on this machine (no
//! Xen), and a hand-driven peer lets each byte be chosen, which a real xenstored would not.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use xen::xenstore::wire::{self, FrameReader, Message, MsgType};
use xen::xenstore::{Transport, WatchEvent, XenStore, XsError, XsOps};

const WAIT: Option<Duration> = Some(Duration::from_secs(5));

/// The far end of the connection, playing the xenbus device or xenstored.
struct Peer {
    stream: UnixStream,
    frames: FrameReader,
}

impl Peer {
    fn recv(&mut self) -> Message {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(m) = self.frames.next_message().unwrap() {
                return m;
            }
            let n = self.stream.read(&mut buf).unwrap();
            assert_ne!(n, 0, "client closed");
            self.frames.push(&buf[..n]);
        }
    }

    fn send(&mut self, ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) {
        self.stream
            .write_all(&wire::encode(ty as u32, req_id, tx_id, payload))
            .unwrap();
    }

    /// Nothing was sent to us.
    fn assert_silent(&mut self) {
        self.stream.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = self.stream.read(&mut b);
        assert!(
            matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        self.stream.set_nonblocking(false).unwrap();
    }
}

fn pair(transport: Transport) -> (XenStore, Peer) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let xs = XenStore::from_fd(a.into(), transport).unwrap();
    (
        xs,
        Peer {
            stream: b,
            frames: FrameReader::new(wire::PAYLOAD_MAX),
        },
    )
}

#[test]
fn xenbus_payload_limit_is_enforced_before_sending() {
    let (xs, mut peer) = pair(Transport::XenbusDevice);
    assert_eq!(xs.transport(), Transport::XenbusDevice);
    // "/p\0" + 4078 bytes = 4081: one over the device's limit.
    let r = xs.write("/p", vec![b'v'; 4078]);
    assert!(
        matches!(
            r,
            Err(XsError::PayloadTooLarge {
                len: 4081,
                max: 4080
            })
        ),
        "{r:?}"
    );
    peer.assert_silent();
    // Exactly at the limit goes out, in one message.
    std::thread::scope(|s| {
        let h = s.spawn(|| xs.write("/p", vec![b'v'; 4077]));
        let m = peer.recv();
        assert_eq!(
            (m.msg_type(), m.payload.len()),
            (Some(MsgType::Write), 4080)
        );
        peer.send(MsgType::Write, m.req_id, 0, b"OK\0");
        h.join().unwrap().unwrap();
    });
}

#[test]
fn socket_allows_the_full_payload() {
    let (xs, mut peer) = pair(Transport::Socket);
    assert!(matches!(
        xs.write("/p", vec![b'v'; 4094]),
        Err(XsError::PayloadTooLarge {
            len: 4097,
            max: 4096
        })
    ));
    std::thread::scope(|s| {
        let h = s.spawn(|| xs.write("/p", vec![b'v'; 4078]));
        let m = peer.recv();
        assert_eq!(m.payload.len(), 4081);
        peer.send(MsgType::Write, m.req_id, 0, b"OK\0");
        h.join().unwrap().unwrap();
    });
}

#[test]
fn watch_events_are_recognised_by_type_not_request_id() {
    let (xs, mut peer) = pair(Transport::XenbusDevice);
    std::thread::scope(|s| {
        let h = s.spawn(|| xs.read("/x"));
        let m = peer.recv();
        assert_eq!(m.msg_type(), Some(MsgType::Read));
        // The device forwards events with whatever ids it had: here the very id of the
        // pending read, and a garbage transaction id.
        peer.send(MsgType::WatchEvent, m.req_id, 0xdead_beef, b"/x/y\0tok\0");
        peer.send(MsgType::Read, m.req_id, 0, b"value");
        assert_eq!(h.join().unwrap().unwrap(), b"value");
    });
    assert_eq!(
        xs.wait_watch_event(WAIT).unwrap(),
        Some(WatchEvent {
            path: "/x/y".into(),
            token: "tok".into()
        })
    );
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    let (xs, mut peer) = pair(Transport::Socket);
    std::thread::scope(|s| {
        let h1 = s.spawn(|| xs.read("/one"));
        let m1 = peer.recv();
        let h2 = s.spawn(|| xs.read("/two"));
        let m2 = peer.recv();
        assert_ne!(m1.req_id, m2.req_id);
        let answer = |m: &Message| {
            if m.payload == b"/one\0" {
                &b"1"[..]
            } else {
                &b"2"[..]
            }
        };
        peer.send(MsgType::Read, m2.req_id, 0, answer(&m2));
        peer.send(MsgType::Read, m1.req_id, 0, answer(&m1));
        assert_eq!(h1.join().unwrap().unwrap(), b"1");
        assert_eq!(h2.join().unwrap().unwrap(), b"2");
    });
}

#[test]
fn malformed_replies_are_typed_errors() {
    let (xs, mut peer) = pair(Transport::Socket);
    std::thread::scope(|s| {
        // A reply of the wrong type.
        let h = s.spawn(|| xs.read("/x"));
        let m = peer.recv();
        peer.send(MsgType::Write, m.req_id, 0, b"OK\0");
        assert!(matches!(h.join().unwrap(), Err(XsError::Protocol(_))));
        // An errno name this client does not know.
        let h = s.spawn(|| xs.read("/x"));
        let m = peer.recv();
        peer.send(MsgType::Error, m.req_id, 0, b"EWHATEVER\0");
        assert!(matches!(h.join().unwrap(), Err(XsError::Other(n)) if n == "EWHATEVER"));
        // Known ones map to their variants.
        let h = s.spawn(|| xs.mkdir("/x"));
        let m = peer.recv();
        peer.send(MsgType::Error, m.req_id, 0, b"EACCES\0");
        assert!(matches!(h.join().unwrap(), Err(XsError::PermissionDenied)));
        // A bad transaction id.
        let h = s.spawn(|| xs.transaction_start().map(|t| t.id()));
        let m = peer.recv();
        peer.send(MsgType::TransactionStart, m.req_id, 0, b"zero\0");
        assert!(matches!(h.join().unwrap(), Err(XsError::Protocol(_))));
        // A reply nobody asked for is ignored; the connection stays usable.
        peer.send(MsgType::Read, 9999, 0, b"stray");
        let h = s.spawn(|| xs.read("/y"));
        let m = peer.recv();
        peer.send(MsgType::Read, m.req_id, 0, b"ok");
        assert_eq!(h.join().unwrap().unwrap(), b"ok");
    });
}

#[test]
fn oversized_or_cut_replies_close_the_connection() {
    let (xs, mut peer) = pair(Transport::Socket);
    std::thread::scope(|s| {
        let h = s.spawn(|| xs.read("/x"));
        let m = peer.recv();
        // A header announcing more than 4096 bytes cannot be resynchronised.
        let mut frame = wire::encode(MsgType::Read as u32, m.req_id, 0, b"");
        frame[12..16].copy_from_slice(&4097u32.to_ne_bytes());
        peer.stream.write_all(&frame).unwrap();
        assert!(matches!(h.join().unwrap(), Err(XsError::Closed)));
    });
    assert!(xs.is_closed());

    let (xs, mut peer) = pair(Transport::Socket);
    std::thread::scope(|s| {
        let h = s.spawn(|| xs.read("/x"));
        let m = peer.recv();
        let frame = wire::encode(MsgType::Read as u32, m.req_id, 0, b"a long value");
        peer.stream.write_all(&frame[..20]).unwrap();
        peer.stream.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(matches!(h.join().unwrap(), Err(XsError::Closed)));
    });
    assert!(matches!(xs.wait_watch_event(WAIT), Err(XsError::Closed)));
}

#[test]
fn transaction_requests_carry_the_transaction_id() {
    let (xs, mut peer) = pair(Transport::XenbusDevice);
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<(), XsError> {
            let tx = xs.transaction_start()?;
            tx.write("/a", "1")?;
            tx.commit()
        });
        let m = peer.recv();
        assert_eq!(
            (m.msg_type(), m.tx_id, m.payload.as_slice()),
            (Some(MsgType::TransactionStart), 0, &b"\0"[..])
        );
        peer.send(MsgType::TransactionStart, m.req_id, 0, b"42\0");
        let m = peer.recv();
        assert_eq!(
            (m.msg_type(), m.tx_id, m.payload.as_slice()),
            (Some(MsgType::Write), 42, &b"/a\x001"[..])
        );
        peer.send(MsgType::Write, m.req_id, 42, b"OK\0");
        let m = peer.recv();
        assert_eq!(
            (m.msg_type(), m.tx_id, m.payload.as_slice()),
            (Some(MsgType::TransactionEnd), 42, &b"T\0"[..])
        );
        peer.send(MsgType::Error, m.req_id, 42, b"EAGAIN\0");
        assert!(matches!(h.join().unwrap(), Err(XsError::Again)));
    });
}
