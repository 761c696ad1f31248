//! The floor under the fan-out benchmark: how fast could any server on this
//! machine push a Discovery update to N subscribers, with tokio, lb-server's
//! store and file source, and the kernel's TCP, but no HTTP/2 library?
//!
//! It stands in for lb-server in the fan-out benchmark: it takes the same
//! flags (it reads only `--file`), prints the same `grpc=ADDR` line, and
//! answers `lookaside.v1.Discovery/Watch` with just enough HTTP/2 for the
//! benchmark's clients: its SETTINGS and their ACKs, PING ACKs, response
//! HEADERS, and each snapshot as one DATA frame written straight to the
//! socket by the connection's one task. No flow control, no HPACK decoding,
//! one stream per connection: not a server, a measuring stick.
//!
//! ```sh
//! cargo build --release -p lb-server --example push_floor
//! FANOUT_WRAPPER=target/release/examples/push_floor FANOUT_ROUNDS=10 \
//!     cargo bench -p lb-server --bench fanout -- discovery 1000 10000
//! ```
//!
//! The difference between its table and lb-server's is what lb-server's
//! HTTP/2 stack (hyper, h2, tonic's body) costs; what is left is the floor.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Buf, BufMut, BytesMut};
use lb_server::{
    api::discovery::framed,
    metrics::Metrics,
    model::{Snapshot, parse_target},
    source::file::FileSource,
    store::Store,
};
use lookaside_proto::lookaside::v1::WatchRequest;
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .windows(2)
        .find(|pair| pair[0] == "--file")
        .map(|pair| PathBuf::from(&pair[1]))
        .expect("--file PATH");
    let store = Store::new();
    let source = FileSource::start(
        file,
        Duration::from_secs(1),
        store.clone(),
        Arc::new(Metrics::new()),
    )
    .expect("a good file");
    let (synced, _ready) = watch::channel(false);
    tokio::spawn(source.run(synced, CancellationToken::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    eprintln!(
        "push_floor listening grpc={}",
        listener.local_addr().unwrap()
    );
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let store = store.clone();
        tokio::spawn(async move {
            let _ = serve(tcp, store).await;
        });
    }
}

fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.put_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// What one frame from the client amounted to.
enum Event {
    /// Handled (or ignored), nothing to report.
    Nothing,
    /// The Watch request, complete, on its stream.
    Request(u32, WatchRequest),
    /// The client is going away.
    GoAway,
}

/// Handles the next frame the client sent, if all of it has arrived.
fn handle(input: &mut BytesMut, out: &mut BytesMut, request: &mut BytesMut) -> Option<Event> {
    if input.len() < 9 {
        return None;
    }
    let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
    if input.len() < 9 + len {
        return None;
    }
    let (kind, flags) = (input[3], input[4]);
    let stream = u32::from_be_bytes(input[5..9].try_into().unwrap()) & 0x7fff_ffff;
    input.advance(9);
    let payload = input.split_to(len);
    match kind {
        SETTINGS if flags & ACK == 0 => frame(out, SETTINGS, ACK, 0, &[]),
        PING if flags & ACK == 0 => frame(out, PING, ACK, 0, &payload),
        DATA => {
            request.extend_from_slice(&payload);
            if request.len() >= 5 {
                let len = u32::from_be_bytes(request[1..5].try_into().unwrap()) as usize;
                if request.len() >= 5 + len {
                    request.advance(5);
                    let message = request.split_to(len);
                    let decoded = WatchRequest::decode(message).expect("a WatchRequest");
                    return Some(Event::Request(stream, decoded));
                }
            }
        }
        GOAWAY => return Some(Event::GoAway),
        _ => {}
    }
    Some(Event::Nothing)
}

async fn serve(mut tcp: TcpStream, store: Arc<Store>) -> std::io::Result<()> {
    let mut input = BytesMut::with_capacity(1024);
    let mut out = BytesMut::with_capacity(256);
    let mut request = BytesMut::new();
    while input.len() < PREFACE_LEN {
        if tcp.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
    input.advance(PREFACE_LEN);
    frame(&mut out, SETTINGS, 0, 0, &[]);
    let (stream, target) = 'request: loop {
        while let Some(event) = handle(&mut input, &mut out, &mut request) {
            match event {
                Event::Request(stream, request) => break 'request (stream, request.target),
                Event::GoAway => return Ok(()),
                Event::Nothing => {}
            }
        }
        tcp.write_all(&out).await?;
        out.clear();
        if tcp.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    };
    let key = parse_target(&target).expect("a valid target");
    let mut subscription = store.subscribe(&key);
    // :status 200 (indexed), content-type: application/grpc (literal).
    let mut headers = vec![0x88, 0x0f, 0x10, 16];
    headers.extend_from_slice(b"application/grpc");
    frame(&mut out, HEADERS, END_HEADERS, stream, &headers);
    let send = |out: &mut BytesMut, snapshot: &Snapshot| {
        let message = framed(&key, snapshot).expect("the snapshot fits a Watch response");
        frame(out, DATA, 0, stream, &message);
    };
    send(&mut out, &subscription.current());
    tcp.write_all(&out).await?;
    out.clear();
    loop {
        tokio::select! {
            snapshot = subscription.next() => send(&mut out, &snapshot),
            read = tcp.read_buf(&mut input) => {
                if read? == 0 {
                    return Ok(());
                }
                while let Some(event) = handle(&mut input, &mut out, &mut request) {
                    if let Event::GoAway = event {
                        return Ok(());
                    }
                }
            }
        }
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            out.clear();
        }
    }
}
