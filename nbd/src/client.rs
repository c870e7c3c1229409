//! A small blocking NBD client: one connection, one request in flight at a time.
//!
//! [`Client::connect`] connects to the server a [`Uri`] names, with a timeout on every
//! socket operation, and negotiates the export ([`crate::handshake`]). Each request is
//! checked against the export before it is sent ([`Export::check`]: size, alignment,
//! read-only, commands offered), and each reply's cookie against the request's. Where
//! structured replies were negotiated, a reply's chunks are checked by
//! [`Reassembly`](crate::structured::Reassembly) and holes read as zeroes.
//!
//! A request the server fails ([`ClientError::Server`]) leaves the connection usable. Any
//! other failure after a request was sent (a socket error, a timeout, a wrong magic, a reply
//! to another cookie) leaves the client out of step with the server, so the connection is
//! marked broken: every later call fails with [`ClientError::Broken`] instead of reading
//! the remains of an earlier reply as a new one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use crate::handshake::{self, Export, HandshakeError};
use crate::socket::{read_array, read_exact, write_all, SocketError};
use crate::structured::{Chunk, ChunkHeader, Reassembly, CHUNK_HEADER_LEN};
use crate::uri::{Transport, UnixSocket, Uri};
use crate::wire::{
    Command, NbdError, Request, RequestError, SimpleReply, WireError, FLAG_FUA, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC,
};

/// The timeout [`Client::connect`] sets on the connection and every read and write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected stream socket to an NBD server.
#[derive(Debug)]
pub enum Stream {
    /// TCP (`nbd://`).
    Tcp(TcpStream),
    /// A Unix socket (`nbd+unix://`).
    Unix(UnixStream),
}

impl Stream {
    /// Connects to the server `uri` names, trying each address a host name resolves to in
    /// turn, each within `timeout` (a Unix socket connects at once or fails).
    ///
    /// # Errors
    /// [`ClientError::Connect`], naming the address.
    pub fn connect(uri: &Uri, timeout: Duration) -> Result<Self, ClientError> {
        match uri.transport() {
            Transport::Tcp { host, port } => {
                let target = format!("{host} port {port}");
                let connect_error = |source| ClientError::Connect {
                    target: target.clone(),
                    source,
                };
                let mut last = None;
                for addr in (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(connect_error)?
                {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            // Requests are small and each waits for its reply: no Nagle.
                            stream.set_nodelay(true).map_err(connect_error)?;
                            return Ok(Self::Tcp(stream));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(connect_error(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the host has no address")
                })))
            }
            Transport::Unix(socket) => {
                let (target, result) = match socket {
                    UnixSocket::Path(path) => {
                        (path.display().to_string(), UnixStream::connect(path))
                    }
                    UnixSocket::Abstract(name) => (
                        format!("abstract socket {:?}", String::from_utf8_lossy(name)),
                        SocketAddr::from_abstract_name(name)
                            .and_then(|addr| UnixStream::connect_addr(&addr)),
                    ),
                };
                result
                    .map(Self::Unix)
                    .map_err(|source| ClientError::Connect { target, source })
            }
        }
    }

    /// Sets the read and write timeouts (`None`: block for ever).
    ///
    /// # Errors
    /// The socket's error.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s
                .set_read_timeout(timeout)
                .and(s.set_write_timeout(timeout)),
            Self::Unix(s) => s
                .set_read_timeout(timeout)
                .and(s.set_write_timeout(timeout)),
        }
    }

    fn shutdown(&self) {
        // Closing is all that is left to do; a socket the server already closed is fine.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The address.
        target: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The handshake failed.
    #[error("NBD handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The request breaks the export's rules; it was not sent.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The server failed the request; the connection is still usable.
    #[error("the server failed {command} of {length} bytes at {offset}: {error}")]
    Server {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The server's error.
        error: NbdError,
    },
    /// The socket failed, timed out, or the server closed it.
    #[error("{0}")]
    Socket(#[from] SocketError),
    /// The server's reply breaks the protocol.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// A reply to a request that is not in flight.
    #[error("a reply with cookie {got:#x}, but the request in flight has cookie {expected:#x}")]
    UnknownCookie {
        /// The cookie of the request in flight.
        expected: u64,
        /// The reply's.
        got: u64,
    },
    /// An earlier error left the connection out of step with the server.
    #[error("the connection is broken by an earlier error; connect again")]
    Broken,
}

impl ClientError {
    /// Whether this error leaves the connection out of step with the server.
    fn breaks_connection(&self) -> bool {
        match self {
            Self::Socket(_) | Self::Wire(_) | Self::UnknownCookie { .. } | Self::Broken => true,
            Self::Connect { .. } | Self::Handshake(_) | Self::Request(_) | Self::Server { .. } => {
                false
            }
        }
    }
}

/// A connection to one export, in the transmission phase.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    export: Export,
    next_cookie: u64,
    broken: bool,
}

impl Client {
    /// Connects to the server and export `uri` names, with [`DEFAULT_TIMEOUT`].
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::Handshake`].
    pub fn connect(uri: &Uri) -> Result<Self, ClientError> {
        Self::connect_timeout(uri, DEFAULT_TIMEOUT)
    }

    /// Connects with `timeout` on the connection and on every read and write after it.
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::Handshake`].
    pub fn connect_timeout(uri: &Uri, timeout: Duration) -> Result<Self, ClientError> {
        Self::handshake(Stream::connect(uri, timeout)?, uri.export(), timeout)
    }

    /// Negotiates `export_name` on a stream that has just connected to a server.
    ///
    /// # Errors
    /// [`ClientError::Handshake`].
    pub fn handshake(
        mut stream: Stream,
        export_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        stream
            .set_timeout(Some(timeout))
            .map_err(|e| SocketError::new("setting the socket's timeout", e))?;
        let export = handshake::negotiate(&mut stream, export_name)?;
        Ok(Self {
            stream,
            export,
            next_cookie: 1,
            broken: false,
        })
    }

    /// What the server said about the export.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The socket and the export, for a caller that takes the transmission phase over.
    pub fn into_parts(self) -> (Stream, Export) {
        (self.stream, self.export)
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// See [`ClientError`]; `buf` is unspecified after an error.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let length = self.payload_length(buf.len())?;
        self.transact(Command::Read, 0, offset, length, &[], buf)
    }

    /// Writes `buf` at `offset`; with `fua`, the server replies only once it is stable.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn write(&mut self, offset: u64, buf: &[u8], fua: bool) -> Result<(), ClientError> {
        let length = self.payload_length(buf.len())?;
        let flags = if fua { FLAG_FUA } else { 0 };
        self.transact(Command::Write, flags, offset, length, buf, &mut [])
    }

    /// Makes every write the server has replied to stable.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.transact(Command::Flush, 0, 0, 0, &[], &mut [])
    }

    /// Tells the server `length` bytes at `offset` are no longer needed.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn trim(&mut self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.transact(Command::Trim, 0, offset, length, &[], &mut [])
    }

    /// Writes `length` zero bytes at `offset`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn write_zeroes(&mut self, offset: u64, length: u32, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.transact(Command::WriteZeroes, flags, offset, length, &[], &mut [])
    }

    /// Ends the session (`NBD_CMD_DISC`, which has no reply) and closes the socket. A
    /// broken connection is just closed.
    ///
    /// # Errors
    /// Sending the request failed.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        let result = if self.broken {
            Ok(())
        } else {
            let request = self.request(Command::Disc, 0, 0, 0);
            write_all(&mut self.stream, &request.encode(), "sending NBD_CMD_DISC")
                .map_err(ClientError::from)
        };
        self.stream.shutdown();
        result
    }

    /// A buffer's length as a request's: more than 4 GiB is more than any server takes.
    fn payload_length(&self, len: usize) -> Result<u32, RequestError> {
        u32::try_from(len).map_err(|_| RequestError::TooLong {
            length: u32::MAX,
            maximum: self.export.block_size.maximum,
        })
    }

    fn request(&mut self, command: Command, flags: u16, offset: u64, length: u32) -> Request {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    /// Sends one request (with `payload` after it) and reads its reply (with `into` after
    /// it, for a successful read).
    fn transact(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        into: &mut [u8],
    ) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let request = self.request(command, flags, offset, length);
        self.export.check(&request)?;
        let result = self.exchange(&request, payload, into);
        if let Err(e) = &result {
            self.broken |= e.breaks_connection();
        }
        result
    }

    fn exchange(
        &mut self,
        request: &Request,
        payload: &[u8],
        into: &mut [u8],
    ) -> Result<(), ClientError> {
        write_all(&mut self.stream, &request.encode(), "sending a request")?;
        write_all(&mut self.stream, payload, "sending a write's data")?;
        let mut reply = Reassembly::new(request.command, request.offset, request.length);
        let mut first = true;
        loop {
            let head: [u8; SIMPLE_REPLY_LEN] = read_array(&mut self.stream, "reading a reply")?;
            if head[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes() && first {
                if self.export.structured_replies && request.command == Command::Read {
                    return Err(WireError::SimpleReadReply.into());
                }
                return self.simple(request, SimpleReply::decode(&head)?, into);
            }
            if !self.export.structured_replies {
                return Err(SimpleReply::decode(&head)
                    .err()
                    .unwrap_or(WireError::StructuredReply)
                    .into());
            }
            first = false;
            let tail: [u8; 4] = read_array(&mut self.stream, "reading a reply")?;
            let mut b = [0u8; CHUNK_HEADER_LEN];
            b[..SIMPLE_REPLY_LEN].copy_from_slice(&head);
            b[SIMPLE_REPLY_LEN..].copy_from_slice(&tail);
            let header = ChunkHeader::decode(&b)?;
            self.check_cookie(request, header.cookie)?;
            let mut fixed = vec![0u8; header.fixed_len()?];
            read_exact(&mut self.stream, &mut fixed, "reading a reply chunk")?;
            let chunk = header.parse(&fixed)?;
            if let Some(range) = reply.accept(&chunk)? {
                // Inside the request (Reassembly's promise), whose length is `into`'s.
                let buf = into.get_mut(range).unwrap_or(&mut []);
                match chunk {
                    Chunk::Data { .. } => {
                        read_exact(&mut self.stream, buf, "reading a read's data")?
                    }
                    _ => buf.fill(0),
                }
            }
            if header.done() {
                return match reply.finish()? {
                    Some(error) => Err(self.server_error(request, error)),
                    None => Ok(()),
                };
            }
        }
    }

    /// A simple reply to `request`, then a read's data into `into`.
    fn simple(
        &mut self,
        request: &Request,
        reply: SimpleReply,
        into: &mut [u8],
    ) -> Result<(), ClientError> {
        self.check_cookie(request, reply.cookie)?;
        if let Some(error) = reply.error {
            // No data follows a failed read's reply.
            return Err(self.server_error(request, error));
        }
        read_exact(&mut self.stream, into, "reading a read's data")?;
        Ok(())
    }

    fn check_cookie(&self, request: &Request, cookie: u64) -> Result<(), ClientError> {
        if cookie != request.cookie {
            return Err(ClientError::UnknownCookie {
                expected: request.cookie,
                got: cookie,
            });
        }
        Ok(())
    }

    fn server_error(&self, request: &Request, error: NbdError) -> ClientError {
        ClientError::Server {
            command: request.command,
            offset: request.offset,
            length: request.length,
            error,
        }
    }
}
