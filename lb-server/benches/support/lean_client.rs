//! A lean gRPC-over-HTTP/2 client for one stream per connection, written for
//! the fan-out benchmark: on one 2-core machine the subscribers share the CPU
//! with the server they measure (in a cluster they are on other machines), so
//! they should cost as little as a client can.
//!
//! It speaks real HTTP/2 to lb-server: the connection preface, SETTINGS (and
//! their ACKs), PING ACKs, one request stream with HPACK-encoded headers and
//! gRPC-framed DATA. It opens its flow-control windows to the maximum up
//! front, so it never needs a WINDOW_UPDATE within a benchmark, and it never
//! decodes response headers or trailers (it only needs the messages).
//!
//! It asks the kernel to timestamp what arrives (`SO_TIMESTAMPNS`), so a
//! message's arrival time is when lb-server's write put it in this socket,
//! not when this client's thread, which shares the machine's two cores with
//! the server it measures, next got a CPU to read it.
//!
//! Over TLS ([`LeanTls`]) it does the handshake with tokio-rustls, then
//! drives the rustls connection itself: it still reads the socket with
//! `recvmsg` for the kernel's timestamp and decrypts what it read.

use std::{
    io::{IoSliceMut, Read, Write},
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt::ReceiveTimestampns,
};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, ClientConnection, pki_types::ServerName},
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// The largest flow-control window HTTP/2 allows.
const MAX_WINDOW: u32 = (1 << 31) - 1;
const DEFAULT_WINDOW: u32 = 65_535;

/// The one request stream's id.
const STREAM: u32 = 1;
/// A frame header's stream id without its reserved bit.
const STREAM_ID_MASK: u32 = (1 << 31) - 1;

fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_string(out: &mut Vec<u8>, value: &str) {
    assert!(value.len() < 127, "long header values are not needed here");
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// A gRPC length-prefixed message (uncompressed).
fn grpc_message(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// TLS for lean calls: the client configuration and the name to verify on
/// the server's certificate.
#[derive(Clone)]
pub(crate) struct LeanTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl LeanTls {
    pub(crate) fn new(config: ClientConfig, name: ServerName<'static>) -> Self {
        Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        }
    }
}

/// One connection carrying one gRPC call.
pub(crate) struct LeanCall {
    tcp: TcpStream,
    /// The TLS session, once its handshake is done; `None` in plaintext.
    tls: Option<Box<ClientConnection>>,
    /// HTTP/2 bytes read (decrypted, over TLS) and not yet handled.
    read: BytesMut,
    /// DATA payload of the stream not yet split into gRPC messages.
    messages: BytesMut,
    out: BytesMut,
    /// When the kernel received the last bytes read.
    arrived: Option<SystemTime>,
    /// HTTP/2 bytes received so far (decrypted, over TLS).
    received: u64,
}

impl LeanCall {
    /// Connects and starts a call of `path` with its first request message.
    /// `more` keeps the request stream open for further messages (bidi).
    /// Over TLS with `tls`, after a full handshake.
    pub(crate) async fn start(
        addr: SocketAddr,
        tls: Option<&LeanTls>,
        path: &str,
        first: &impl prost::Message,
        more: bool,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        setsockopt(&tcp, ReceiveTimestampns, &true)?;
        let (tcp, tls) = match tls {
            Some(tls) => {
                let stream = tls.connector.connect(tls.name.clone(), tcp).await?;
                let (tcp, session) = stream.into_inner();
                (tcp, Some(Box::new(session)))
            }
            None => (tcp, None),
        };
        let mut out = BytesMut::with_capacity(512);
        out.put_slice(PREFACE);
        // SETTINGS: ENABLE_PUSH = 0, INITIAL_WINDOW_SIZE = max.
        let mut settings = Vec::new();
        settings.extend_from_slice(&0x2u16.to_be_bytes());
        settings.extend_from_slice(&0u32.to_be_bytes());
        settings.extend_from_slice(&0x4u16.to_be_bytes());
        settings.extend_from_slice(&MAX_WINDOW.to_be_bytes());
        frame(&mut out, SETTINGS, 0, 0, &settings);
        frame(
            &mut out,
            WINDOW_UPDATE,
            0,
            0,
            &(MAX_WINDOW - DEFAULT_WINDOW).to_be_bytes(),
        );
        // :method POST, :scheme https or http
        let mut headers = vec![0x83, if tls.is_some() { 0x87 } else { 0x86 }];
        headers.push(0x04); // :path, literal value
        hpack_string(&mut headers, path);
        headers.push(0x01); // :authority, literal value
        hpack_string(&mut headers, &addr.to_string());
        headers.extend_from_slice(&[0x0f, 0x10]); // content-type, literal value
        hpack_string(&mut headers, "application/grpc");
        headers.push(0x00); // a new name, literal value
        hpack_string(&mut headers, "te");
        hpack_string(&mut headers, "trailers");
        frame(&mut out, HEADERS, END_HEADERS, STREAM, &headers);
        let flags = if more { 0 } else { END_STREAM };
        frame(&mut out, DATA, flags, STREAM, &grpc_message(first));
        let mut call = Self {
            tcp,
            tls,
            read: BytesMut::with_capacity(4096),
            messages: BytesMut::new(),
            out,
            arrived: None,
            received: 0,
        };
        call.flush().await?;
        Ok(call)
    }

    /// Sends one more request message on the stream.
    pub(crate) async fn send(&mut self, message: &impl prost::Message) -> std::io::Result<()> {
        frame(&mut self.out, DATA, 0, STREAM, &grpc_message(message));
        self.flush().await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.tls {
            Some(session) => {
                session.writer().write_all(&self.out)?;
                let mut records = Vec::with_capacity(self.out.len() + 64);
                while session.wants_write() {
                    session.write_tls(&mut records)?;
                }
                self.tcp.write_all(&records).await?;
            }
            None => self.tcp.write_all(&self.out).await?,
        }
        self.out.clear();
        Ok(())
    }

    /// The next response message's bytes, or `None` when the call or the
    /// connection has ended.
    pub(crate) async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            if let Some(message) = self.take_message() {
                return Ok(Some(message));
            }
            if !self.read_frame().await? {
                return Ok(None);
            }
        }
    }

    /// When the kernel received the bytes of the last message [`Self::next`]
    /// returned (the last of them, if they came in more than one segment).
    pub(crate) fn arrived(&self) -> Option<SystemTime> {
        self.arrived
    }

    /// HTTP/2 bytes this call's connection has received so far (after
    /// decryption, over TLS): frame headers, gRPC prefixes and messages.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// Reads what the socket has into `read`, with the kernel's receive
    /// time of the last segment; 0 at the end of the connection.
    async fn read_some(&mut self) -> std::io::Result<usize> {
        let mut buf = [0u8; 4096];
        let mut control = nix::cmsg_space!(nix::sys::time::TimeSpec);
        loop {
            self.tcp.readable().await?;
            let fd = self.tcp.as_raw_fd();
            let received = self.tcp.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let message = recvmsg::<()>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
                let mut arrived = None;
                for cmsg in message.cmsgs()? {
                    if let ControlMessageOwned::ScmTimestampns(at) = cmsg {
                        let since_epoch = Duration::new(at.tv_sec() as u64, at.tv_nsec() as u32);
                        arrived = Some(SystemTime::UNIX_EPOCH + since_epoch);
                    }
                }
                Ok((message.bytes, arrived))
            });
            match received {
                Ok((n, arrived)) => {
                    if arrived.is_some() {
                        self.arrived = arrived;
                    }
                    let Some(session) = &mut self.tls else {
                        self.read.extend_from_slice(&buf[..n]);
                        self.received += n as u64;
                        return Ok(n);
                    };
                    if n == 0 {
                        return Ok(0);
                    }
                    match decrypt(session, &buf[..n], &mut self.read)? {
                        // Only TLS records with no application data (such as
                        // session tickets): read on.
                        Some(0) => continue,
                        Some(plain) => {
                            self.received += plain as u64;
                            return Ok(plain);
                        }
                        None => return Ok(0),
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }

    fn take_message(&mut self) -> Option<Bytes> {
        if self.messages.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes(self.messages[1..5].try_into().unwrap()) as usize;
        if self.messages.len() < 5 + len {
            return None;
        }
        self.messages.advance(5);
        Some(self.messages.split_to(len).freeze())
    }

    /// Reads and handles one frame; false when the stream or connection ended.
    async fn read_frame(&mut self) -> std::io::Result<bool> {
        while self.read.len() < 9 || self.read.len() < 9 + frame_len(&self.read) {
            if self.read_some().await? == 0 {
                return Ok(false);
            }
        }
        let len = frame_len(&self.read);
        let kind = self.read[3];
        let flags = self.read[4];
        let stream = u32::from_be_bytes(self.read[5..9].try_into().unwrap()) & STREAM_ID_MASK;
        self.read.advance(9);
        let mut payload = self.read.split_to(len);
        match kind {
            DATA if stream == STREAM => {
                if flags & PADDED != 0 {
                    let pad = payload.get_u8() as usize;
                    payload.truncate(payload.len() - pad);
                }
                self.messages.extend_from_slice(&payload);
                Ok(flags & END_STREAM == 0)
            }
            HEADERS if stream == STREAM => Ok(flags & END_STREAM == 0),
            SETTINGS if flags & ACK == 0 => {
                frame(&mut self.out, SETTINGS, ACK, 0, &[]);
                self.flush().await?;
                Ok(true)
            }
            PING if flags & ACK == 0 => {
                frame(&mut self.out, PING, ACK, 0, &payload);
                self.flush().await?;
                Ok(true)
            }
            GOAWAY => Ok(false),
            RST_STREAM if stream == STREAM => Ok(false),
            _ => Ok(true),
        }
    }
}

/// Feeds `records` to the TLS session and appends what they decrypt to
/// `plain`: how many bytes, or `None` once the server has closed the session.
fn decrypt(
    session: &mut ClientConnection,
    mut records: &[u8],
    plain: &mut BytesMut,
) -> std::io::Result<Option<usize>> {
    let before = plain.len();
    let mut chunk = [0u8; 4096];
    while !records.is_empty() {
        session.read_tls(&mut records)?;
        session
            .process_new_packets()
            .map_err(std::io::Error::other)?;
        loop {
            match session.reader().read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => plain.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
    }
    Ok(Some(plain.len() - before))
}

fn frame_len(head: &[u8]) -> usize {
    u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize
}
