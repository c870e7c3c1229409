//! The client against fake servers that break the protocol: each test's server is a thread at
//! the other end of a Unix socket pair, scripted to send one kind of nonsense. Every case must
//! end in a clear error: no panic, no hang (the client's timeout is short, the fake server's
//! socket has one too, and it returns when the client closes its end).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nbd::handshake::{
    HandshakeError, RepError, CLISERV_MAGIC, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC,
    OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_UNSUP, REP_INFO,
};
use nbd::structured::{
    ChunkHeader, REPLY_FLAG_DONE, TYPE_ERROR, TYPE_ERROR_OFFSET, TYPE_NONE, TYPE_OFFSET_DATA,
    TYPE_OFFSET_HOLE,
};
use nbd::wire::{Request, SimpleReply, REQUEST_LEN, STRUCTURED_REPLY_MAGIC};
use nbd::{
    Client, ClientError, Command, NbdError, Negotiated, SocketError, Stream, TransmissionFlags,
    WireError,
};

/// The client's timeout: long enough for a thread on a loaded machine, short enough that a
/// test of a silent server is quick.
const TIMEOUT: Duration = Duration::from_secs(2);
const SIZE: u64 = 1 << 20;
/// HAS_FLAGS | SEND_FLUSH | SEND_FUA.
const FLAGS: u16 =
    TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA;

/// A scripted server; its result is whatever the script wants to report back.
struct Fake<T>(JoinHandle<io::Result<T>>);

impl<T> Fake<T> {
    fn result(self) -> io::Result<T> {
        self.0.join().expect("the fake server's thread panicked")
    }
}

fn fake<T: Send + 'static>(
    script: impl FnOnce(&mut UnixStream) -> io::Result<T> + Send + 'static,
) -> (Stream, Fake<T>) {
    let (client, mut server) = UnixStream::pair().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    server
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let thread = thread::spawn(move || script(&mut server));
    (Stream::Unix(client), Fake(thread))
}

/// Negotiates against a fake server, which is left running.
fn handshake<T: Send + 'static>(
    script: impl FnOnce(&mut UnixStream) -> io::Result<T> + Send + 'static,
) -> (Result<Client, ClientError>, Fake<T>) {
    let (stream, server) = fake(script);
    (Client::handshake(stream, "disk", TIMEOUT), server)
}

fn handshake_error<T: Send + 'static>(
    script: impl FnOnce(&mut UnixStream) -> io::Result<T> + Send + 'static,
) -> (HandshakeError, Fake<T>) {
    let start = Instant::now();
    let (result, server) = handshake(script);
    let error = match result {
        Ok(client) => panic!("the handshake succeeded: {:?}", client.export()),
        Err(ClientError::Handshake(e)) => e,
        Err(e) => panic!("not a handshake error: {e}"),
    };
    println!("error: {error}");
    assert!(!error.to_string().is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    (error, server)
}

fn u32_be(s: &mut UnixStream) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_be(s: &mut UnixStream) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Sends the newstyle greeting with `flags`; returns the client's flags. A fixed-newstyle
/// client asks for structured replies first: refused (`NBD_REP_ERR_UNSUP`).
fn greet(s: &mut UnixStream, flags: u16) -> io::Result<u32> {
    greet_structured(s, flags, false)
}

/// [`greet`], with structured replies agreed when `structured`.
fn greet_structured(s: &mut UnixStream, flags: u16, structured: bool) -> io::Result<u32> {
    s.write_all(&NBDMAGIC.to_be_bytes())?;
    s.write_all(&IHAVEOPT.to_be_bytes())?;
    s.write_all(&flags.to_be_bytes())?;
    let client_flags = u32_be(s)?;
    if flags & FLAG_FIXED_NEWSTYLE != 0 {
        let (option, data) = read_option(s)?;
        assert_eq!((option, data.len()), (OPT_STRUCTURED_REPLY, 0));
        let answer = if structured { REP_ACK } else { REP_ERR_UNSUP };
        reply(s, option, answer, &[])?;
    }
    Ok(client_flags)
}

/// Reads one option: its number and data.
fn read_option(s: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    assert_eq!(u64_be(s)?, IHAVEOPT);
    let option = u32_be(s)?;
    let mut data = vec![0; u32_be(s)? as usize];
    s.read_exact(&mut data)?;
    Ok((option, data))
}

fn reply(s: &mut UnixStream, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    s.write_all(&OPTION_REPLY_MAGIC.to_be_bytes())?;
    s.write_all(&option.to_be_bytes())?;
    s.write_all(&kind.to_be_bytes())?;
    s.write_all(&(payload.len() as u32).to_be_bytes())?;
    s.write_all(payload)
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p
}

fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [minimum, preferred, maximum] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

/// A fixed-newstyle greeting, then the client's first option (`NBD_OPT_GO`) read and ignored.
fn greeted_and_asked(s: &mut UnixStream) -> io::Result<()> {
    greet(s, FLAG_FIXED_NEWSTYLE)?;
    read_option(s).map(drop)
}

/// A well-behaved handshake: fixed newstyle, `NBD_OPT_GO` for "disk", the export's size and
/// flags and block sizes, `NBD_REP_ACK`.
fn serve_go(s: &mut UnixStream) -> io::Result<()> {
    serve_go_with(s, false)
}

/// [`serve_go`], with structured replies agreed when `structured`.
fn serve_go_with(s: &mut UnixStream, structured: bool) -> io::Result<()> {
    greet_structured(s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, structured)?;
    let (option, data) = read_option(s)?;
    assert_eq!(option, OPT_GO);
    // Name length, name, one information request: NBD_INFO_BLOCK_SIZE.
    let mut expected = 4u32.to_be_bytes().to_vec();
    expected.extend_from_slice(b"disk");
    expected.extend_from_slice(&[0, 1, 0, 3]);
    assert_eq!(data, expected);
    reply(s, OPT_GO, REP_INFO, &info_block_size(512, 4096, 1 << 20))?;
    reply(s, OPT_GO, REP_INFO, &info_export(SIZE, FLAGS))?;
    reply(s, OPT_GO, REP_ACK, &[])
}

/// Reads a request (and a write's data).
fn read_request(s: &mut UnixStream) -> io::Result<Request> {
    let mut b = [0; REQUEST_LEN];
    s.read_exact(&mut b)?;
    let request = Request::decode(&b).expect("the client sent a bad request");
    if request.command == Command::Write {
        io::copy(&mut s.take(u64::from(request.length)), &mut io::sink())?;
    }
    Ok(request)
}

fn simple_reply(s: &mut UnixStream, error: Option<NbdError>, cookie: u64) -> io::Result<()> {
    s.write_all(&SimpleReply { error, cookie }.encode())
}

/// Waits for the client to close its end (bounded by the server's socket timeout).
fn drain(s: &mut UnixStream) -> io::Result<()> {
    io::copy(s, &mut io::sink()).map(drop)
}

#[test]
fn wrong_greeting_magic() {
    let (e, _) = handshake_error(|s| {
        s.write_all(b"NOTMAGIC")?;
        drain(s)
    });
    assert!(
        matches!(
            e,
            HandshakeError::BadMagic {
                what: "greeting",
                got: 0x4e4f_544d_4147_4943,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn wrong_newstyle_magic_and_oldstyle() {
    let (e, _) = handshake_error(|s| {
        s.write_all(&NBDMAGIC.to_be_bytes())?;
        s.write_all(&0x1234u64.to_be_bytes())?;
        drain(s)
    });
    assert!(
        matches!(
            e,
            HandshakeError::BadMagic {
                what: "newstyle greeting",
                got: 0x1234,
                ..
            }
        ),
        "{e:?}"
    );
    let (e, _) = handshake_error(|s| {
        s.write_all(&NBDMAGIC.to_be_bytes())?;
        s.write_all(&CLISERV_MAGIC.to_be_bytes())?;
        drain(s)
    });
    assert!(matches!(e, HandshakeError::Oldstyle), "{e:?}");
}

#[test]
fn oversized_option_reply_is_refused_before_reading_it() {
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        // A 2 GiB payload announced and never sent: the client must not wait for it (nor
        // allocate it).
        s.write_all(&OPTION_REPLY_MAGIC.to_be_bytes())?;
        s.write_all(&OPT_GO.to_be_bytes())?;
        s.write_all(&REP_INFO.to_be_bytes())?;
        s.write_all(&0x8000_0000u32.to_be_bytes())?;
        drain(s)
    });
    assert!(
        matches!(e, HandshakeError::ReplyTooLong(0x8000_0000)),
        "{e:?}"
    );
}

#[test]
fn option_reply_with_wrong_magic_or_option() {
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        s.write_all(&[0xff; 20])?;
        drain(s)
    });
    assert!(
        matches!(
            e,
            HandshakeError::BadMagic {
                what: "option reply",
                ..
            }
        ),
        "{e:?}"
    );
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        reply(s, OPT_EXPORT_NAME, REP_ACK, &[])?;
        drain(s)
    });
    assert!(
        matches!(
            e,
            HandshakeError::WrongOption {
                sent: OPT_GO,
                got: OPT_EXPORT_NAME
            }
        ),
        "{e:?}"
    );
}

#[test]
fn endless_info_replies_are_cut_off() {
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        for _ in 0..1000 {
            // An information type the client does not know, so it is skipped.
            if reply(s, OPT_GO, REP_INFO, &[0x7f, 0x7f]).is_err() {
                break;
            }
        }
        drain(s)
    });
    assert!(matches!(e, HandshakeError::TooManyReplies), "{e:?}");
}

#[test]
fn malformed_info_replies() {
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        let mut short = info_export(SIZE, FLAGS);
        short.pop();
        reply(s, OPT_GO, REP_INFO, &short)?;
        drain(s)
    });
    assert!(
        matches!(
            e,
            HandshakeError::InfoLength {
                info: INFO_EXPORT,
                len: 11,
                expected: 12
            }
        ),
        "{e:?}"
    );
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        reply(s, OPT_GO, REP_ACK, &[])?;
        drain(s)
    });
    assert!(matches!(e, HandshakeError::NoExportInfo), "{e:?}");
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        reply(s, OPT_GO, REP_INFO, &info_block_size(3, 4096, 1 << 20))?;
        reply(s, OPT_GO, REP_INFO, &info_export(SIZE, FLAGS))?;
        reply(s, OPT_GO, REP_ACK, &[])?;
        drain(s)
    });
    assert!(
        matches!(e, HandshakeError::InvalidBlockSize(b) if b.minimum == 3),
        "{e:?}"
    );
    let (e, _) = handshake_error(|s| {
        greeted_and_asked(s)?;
        reply(s, OPT_GO, REP_INFO, &info_export(SIZE, 0))?;
        reply(s, OPT_GO, REP_ACK, &[])?;
        drain(s)
    });
    assert!(matches!(e, HandshakeError::NoFlags(0)), "{e:?}");
}

#[test]
fn refused_export_is_an_error_with_the_servers_message_and_an_abort() {
    let (e, server) = handshake_error(|s| {
        greeted_and_asked(s)?;
        reply(s, OPT_GO, 0x8000_0006, b"no export \"disk\"\x1b[2J")?;
        let (next, _) = read_option(s)?;
        drain(s)?;
        Ok(next)
    });
    match &e {
        HandshakeError::Refused {
            option: "NBD_OPT_GO",
            error: RepError::Unknown,
            message,
        } => {
            assert_eq!(message, "no export \"disk\"\x1b[2J");
            // The escape sequence is shown escaped, not sent to a terminal.
            assert!(e.to_string().contains("\\u{1b}[2J"), "{e}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(server.result().unwrap(), OPT_ABORT);
}

#[test]
fn falls_back_to_export_name_only_when_go_is_unsupported() {
    for no_zeroes in [true, false] {
        let (client, server) = handshake(move |s| {
            let client_flags = greet(
                s,
                FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 },
            )?;
            let (option, _) = read_option(s)?;
            assert_eq!(option, OPT_GO);
            reply(s, OPT_GO, REP_ERR_UNSUP, b"what is GO?")?;
            let (option, name) = read_option(s)?;
            assert_eq!((option, name.as_slice()), (OPT_EXPORT_NAME, &b"disk"[..]));
            s.write_all(&SIZE.to_be_bytes())?;
            s.write_all(&FLAGS.to_be_bytes())?;
            if !no_zeroes {
                s.write_all(&[0; 124])?;
            }
            // In step: one read.
            let request = read_request(s)?;
            simple_reply(s, None, request.cookie)?;
            s.write_all(&vec![0xa5; request.length as usize])?;
            drain(s)?;
            Ok(client_flags)
        });
        let mut client = client.unwrap();
        let export = *client.export();
        assert_eq!((export.size, export.via), (SIZE, Negotiated::ExportName));
        assert_eq!(export.block_size, nbd::BlockSize::DEFAULT);
        let mut buf = [0; 512];
        client.read(512, &mut buf).unwrap();
        assert_eq!(buf, [0xa5; 512]);
        client.disconnect().unwrap();
        let expected = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        assert_eq!(server.result().unwrap(), expected);
    }
}

#[test]
fn export_name_refused_by_closing() {
    let (e, _) = handshake_error(|s| {
        greet(s, 0)?;
        // Not fixed newstyle: the client goes straight to NBD_OPT_EXPORT_NAME.
        let (option, _) = read_option(s)?;
        assert_eq!(option, OPT_EXPORT_NAME);
        Ok(())
    });
    assert!(
        matches!(&e, HandshakeError::ExportNameRefused(name) if name == "disk"),
        "{e:?}"
    );
}

#[test]
fn silent_server_times_out() {
    let (e, _) = handshake_error(drain);
    assert!(
        matches!(e, HandshakeError::Socket(SocketError::TimedOut(_))),
        "{e:?}"
    );
    let (e, _) = handshake_error(|s| {
        s.write_all(&NBDMAGIC.to_be_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        drain(s)
    });
    assert!(
        matches!(e, HandshakeError::Socket(SocketError::Closed(_))),
        "{e:?}"
    );
}

/// Negotiates, then runs `script` for the transmission phase; returns the client.
fn transmission(
    script: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static,
) -> (Client, Fake<()>) {
    let (client, server) = handshake(move |s| {
        serve_go(s)?;
        script(s)
    });
    let client = client.unwrap();
    let export = client.export();
    assert_eq!(
        (export.size, export.flags.bits(), export.via),
        (SIZE, FLAGS, Negotiated::Go)
    );
    assert_eq!(export.block_size.minimum, 512);
    (client, server)
}

#[test]
fn reply_with_unknown_cookie_breaks_the_connection() {
    let (mut client, _server) = transmission(|s| {
        let request = read_request(s)?;
        simple_reply(s, None, request.cookie ^ 0xdead)?;
        drain(s)
    });
    let e = client.flush().unwrap_err();
    println!("error: {e}");
    assert!(
        matches!(e, ClientError::UnknownCookie { expected, got } if got == expected ^ 0xdead),
        "{e:?}"
    );
    // Out of step for good: nothing else is sent or read.
    assert!(matches!(client.flush(), Err(ClientError::Broken)));
    client.disconnect().unwrap();
}

#[test]
fn short_read_mid_reply() {
    // The reply's header, then 100 of the 4096 bytes, then the end of the connection.
    let (mut client, _server) = transmission(|s| {
        let request = read_request(s)?;
        simple_reply(s, None, request.cookie)?;
        s.write_all(&[7; 100])
    });
    let e = client.read(0, &mut [0; 4096]).unwrap_err();
    println!("error: {e}");
    assert!(
        matches!(
            e,
            ClientError::Socket(SocketError::Closed("reading a read's data"))
        ),
        "{e:?}"
    );
    assert!(matches!(
        client.read(0, &mut [0; 512]),
        Err(ClientError::Broken)
    ));
}

#[test]
fn eof_mid_reply_header() {
    let (mut client, _server) = transmission(|s| {
        read_request(s)?;
        s.write_all(&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0])
    });
    let e = client.write(0, &[1; 512], false).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Socket(SocketError::Closed("reading a reply"))
        ),
        "{e:?}"
    );
}

#[test]
fn silent_server_in_transmission_times_out() {
    let (mut client, _server) = transmission(|s| {
        read_request(s)?;
        drain(s)
    });
    let start = Instant::now();
    let e = client.read(0, &mut [0; 512]).unwrap_err();
    assert!(
        matches!(e, ClientError::Socket(SocketError::TimedOut(_))),
        "{e:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A transmission phase with structured replies agreed.
fn structured_transmission(
    script: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static,
) -> (Client, Fake<()>) {
    let (client, server) = handshake(move |s| {
        serve_go_with(s, true)?;
        script(s)
    });
    let client = client.unwrap();
    assert!(client.export().structured_replies);
    (client, server)
}

/// Sends one structured reply chunk.
fn chunk(s: &mut UnixStream, done: bool, kind: u16, cookie: u64, payload: &[u8]) -> io::Result<()> {
    let header = ChunkHeader {
        flags: if done { REPLY_FLAG_DONE } else { 0 },
        kind,
        cookie,
        length: payload.len() as u32,
    };
    s.write_all(&header.encode())?;
    s.write_all(payload)
}

fn at(offset: u64, rest: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(rest);
    p
}

/// Data and holes in any order make up a read; error chunks fail it and keep the connection.
#[test]
fn structured_reads_are_reassembled() {
    let (mut client, server) = structured_transmission(|s| {
        let r = read_request(s)?;
        assert_eq!((r.offset, r.length), (4096, 8192));
        chunk(
            s,
            false,
            TYPE_OFFSET_HOLE,
            r.cookie,
            &at(8192, &4096u32.to_be_bytes()),
        )?;
        chunk(s, false, TYPE_OFFSET_DATA, r.cookie, &at(4096, &[7; 4096]))?;
        chunk(s, true, TYPE_NONE, r.cookie, &[])?;
        let r = read_request(s)?;
        chunk(s, false, TYPE_OFFSET_DATA, r.cookie, &at(0, &[1; 512]))?;
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&4u16.to_be_bytes());
        e.extend_from_slice(b"oops");
        e.extend_from_slice(&512u64.to_be_bytes());
        chunk(s, true, TYPE_ERROR_OFFSET, r.cookie, &e)?;
        let r = read_request(s)?;
        assert_eq!(r.command, Command::Write);
        chunk(s, true, TYPE_NONE, r.cookie, &[])?;
        let r = read_request(s)?;
        // A simple reply to anything but a read is still allowed.
        simple_reply(s, None, r.cookie)?;
        drain(s)
    });
    let mut buf = [0xff; 8192];
    client.read(4096, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7));
    assert!(
        buf[4096..].iter().all(|&b| b == 0),
        "the hole is not zeroes"
    );
    let e = client.read(0, &mut [0; 1024]).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                error: NbdError::Io,
                ..
            }
        ),
        "{e:?}"
    );
    client.write(0, &[1; 512], false).unwrap();
    client.flush().unwrap();
    client.disconnect().unwrap();
    server.result().unwrap();
}

/// Chunks that break the rules break the connection, with an error that says which rule.
#[test]
fn bad_chunks_break_the_connection() {
    type Script = fn(&mut UnixStream, Request) -> io::Result<()>;
    let cases: [(Script, WireError); 8] = [
        // Overlapping data.
        (
            |s, r| {
                chunk(s, false, TYPE_OFFSET_DATA, r.cookie, &at(4096, &[1; 512]))?;
                chunk(s, true, TYPE_OFFSET_DATA, r.cookie, &at(4352, &[1; 512]))
            },
            WireError::ChunkOverlap {
                offset: 4352,
                len: 512,
            },
        ),
        // Data before the request.
        (
            |s, r| chunk(s, true, TYPE_OFFSET_DATA, r.cookie, &at(0, &[1; 512])),
            WireError::ChunkOutside {
                offset: 0,
                len: 512,
            },
        ),
        // A hole past its end.
        (
            |s, r| {
                chunk(
                    s,
                    true,
                    TYPE_OFFSET_HOLE,
                    r.cookie,
                    &at(4096, &1025u32.to_be_bytes()),
                )
            },
            WireError::ChunkOutside {
                offset: 4096,
                len: 1025,
            },
        ),
        // Done before every byte came.
        (
            |s, r| chunk(s, true, TYPE_OFFSET_DATA, r.cookie, &at(4096, &[1; 512])),
            WireError::Incomplete,
        ),
        // A simple reply to a read.
        (
            |s, r| simple_reply(s, None, r.cookie),
            WireError::SimpleReadReply,
        ),
        // NBD_REPLY_TYPE_NONE that is not the last chunk.
        (
            |s, r| chunk(s, false, TYPE_NONE, r.cookie, &[]),
            WireError::NoneNotDone,
        ),
        // A type nobody knows, without the error bit.
        (
            |s, r| chunk(s, true, 77, r.cookie, &[]),
            WireError::ChunkType(77),
        ),
        // An error chunk longer than any allowed.
        (
            |s, r| chunk(s, true, TYPE_ERROR, r.cookie, &[0; 5000]),
            WireError::ChunkLength {
                kind: TYPE_ERROR,
                length: 5000,
            },
        ),
    ];
    for (script, expected) in cases {
        let (mut client, _server) = structured_transmission(move |s| {
            let r = read_request(s)?;
            script(s, r)?;
            drain(s)
        });
        let e = client.read(4096, &mut [0; 1024]).unwrap_err();
        println!("error: {e}");
        assert!(
            matches!(&e, ClientError::Wire(w) if *w == expected),
            "{e:?}, expected {expected:?}"
        );
        assert!(matches!(
            client.read(4096, &mut [0; 512]),
            Err(ClientError::Broken)
        ));
    }
}

#[test]
fn wrong_reply_magic_and_structured_reply() {
    let (mut client, _server) = transmission(|s| {
        let request = read_request(s)?;
        s.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        s.write_all(&[0; 4])?;
        s.write_all(&request.cookie.to_be_bytes())?;
        drain(s)
    });
    let e = client.read(0, &mut [0; 512]).unwrap_err();
    println!("error: {e}");
    assert!(
        matches!(e, ClientError::Wire(WireError::StructuredReply)),
        "{e:?}"
    );

    let (mut client, _server) = transmission(|s| {
        read_request(s)?;
        s.write_all(&[0xee; 16])?;
        drain(s)
    });
    let e = client.read(0, &mut [0; 512]).unwrap_err();
    assert!(
        matches!(e, ClientError::Wire(WireError::ReplyMagic(0xeeee_eeee))),
        "{e:?}"
    );
}

#[test]
fn server_errors_keep_the_connection() {
    let (mut client, server) = transmission(|s| {
        let request = read_request(s)?;
        assert_eq!((request.command, request.flags), (Command::Write, 1));
        simple_reply(s, Some(NbdError::Io), request.cookie)?;
        let request = read_request(s)?;
        simple_reply(s, Some(NbdError::from_u32(0x4242).unwrap()), request.cookie)?;
        let request = read_request(s)?;
        assert_eq!(request.command, Command::Read);
        simple_reply(s, None, request.cookie)?;
        s.write_all(&[3; 1024])?;
        let request = read_request(s)?;
        assert_eq!(request.command, Command::Disc);
        drain(s)
    });
    let e = client.write(4096, &[1; 512], true).unwrap_err();
    println!("error: {e}");
    assert!(
        matches!(
            e,
            ClientError::Server {
                command: Command::Write,
                offset: 4096,
                length: 512,
                error: NbdError::Io
            }
        ),
        "{e:?}"
    );
    let e = client.flush().unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                error: NbdError::Other(0x4242),
                ..
            }
        ),
        "{e:?}"
    );
    let mut buf = [0; 1024];
    client.read(1024, &mut buf).unwrap();
    assert_eq!(buf, [3; 1024]);
    // Refused here, never sent: the export has no trim, and this is past its end.
    assert!(matches!(client.trim(0, 512), Err(ClientError::Request(_))));
    assert!(matches!(
        client.read(SIZE, &mut buf),
        Err(ClientError::Request(_))
    ));
    client.disconnect().unwrap();
    server.result().unwrap();
}

#[test]
fn connect_through_uris_to_an_abstract_socket_and_to_nothing() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};

    let name = format!("nbd-test-{}", std::process::id());
    let listener =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let server = thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        serve_go(&mut s)?;
        let request = read_request(&mut s)?;
        simple_reply(&mut s, None, request.cookie)?;
        s.write_all(&[9; 512])?;
        drain(&mut s)
    });
    let uri: nbd::Uri = format!("nbd+unix:///disk?socket=%00{name}")
        .parse()
        .unwrap();
    let mut client = Client::connect_timeout(&uri, TIMEOUT).unwrap();
    let mut buf = [0; 512];
    client.read(0, &mut buf).unwrap();
    assert_eq!(buf, [9; 512]);
    client.disconnect().unwrap();
    server.join().unwrap().unwrap();

    // Nothing listens: a connection error that names where, at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for uri in [
        format!("nbd://127.0.0.1:{port}/"),
        format!("nbd+unix:///?socket=%00{name}"),
        "nbd+unix:///?socket=/nonexistent/nbd.sock".to_owned(),
    ] {
        let e = Client::connect_timeout(&uri.parse().unwrap(), TIMEOUT).unwrap_err();
        println!("{e}");
        assert!(matches!(e, ClientError::Connect { .. }), "{uri}: {e:?}");
    }
}
