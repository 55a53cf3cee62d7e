//! An HTTP/2 upstream written frame by frame, for what a real server cannot be told to do on
//! cue: turn away the first request stream it sees, with `RST_STREAM(REFUSED_STREAM)` or with a
//! `GOAWAY` whose last stream id is below it (RFC 9113 8.7: either means the request was not
//! processed and may be sent again). Every later stream is answered `200` with no body.
//!
//! Dropping a [`Peer`] aborts its accept loop and every connection it accepted.
//!
//! [`DeafClient`] is the other side: a client that opens an HTTP/2 connection and then answers
//! nothing, neither the server's SETTINGS nor its PING nor its GOAWAY.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How the first request stream is turned away.
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    /// `RST_STREAM` with `REFUSED_STREAM` on that stream; the connection stays usable.
    RefusedStream,
    /// `GOAWAY` with last stream id 0 and `NO_ERROR`: no stream was processed.
    GoAway,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
/// HPACK: the static table's entry 8, `:status: 200`.
const STATUS_200: u8 = 0x88;

pub struct Peer {
    addr: SocketAddr,
    counts: Arc<Counts>,
    _tasks: JoinSet<()>,
}

#[derive(Default)]
struct Counts {
    refused: AtomicU64,
    answered: AtomicU64,
    connections: AtomicU64,
}

/// Starts a peer on `127.0.0.1:0` that turns away the first request stream as `refusal` says.
pub async fn refusing_first(refusal: Refusal) -> Peer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let counts = Arc::new(Counts::default());
    let mut tasks = JoinSet::new();
    let c = counts.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            c.connections.fetch_add(1, Ordering::SeqCst);
            conns.spawn(serve(stream, refusal, c.clone()));
        }
    });
    Peer {
        addr,
        counts,
        _tasks: tasks,
    }
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Request streams turned away.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::SeqCst)
    }

    /// Request streams answered `200`.
    pub fn answered(&self) -> u64 {
        self.counts.answered.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut io: TcpStream, refusal: Refusal, counts: Arc<Counts>) {
    let mut preface = [0u8; PREFACE.len()];
    if io.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    if io.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err() {
        return;
    }
    while let Ok((kind, flags, stream)) = read_frame(&mut io).await {
        let reply = match kind {
            SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
            HEADERS if counts.refused.load(Ordering::SeqCst) == 0 => {
                counts.refused.fetch_add(1, Ordering::SeqCst);
                match refusal {
                    Refusal::RefusedStream => {
                        frame(RST_STREAM, 0, stream, &REFUSED_STREAM.to_be_bytes())
                    }
                    Refusal::GoAway => {
                        let mut payload = [0u8; 8];
                        payload[..4].copy_from_slice(&0u32.to_be_bytes());
                        frame(GOAWAY, 0, 0, &payload)
                    }
                }
            }
            HEADERS => {
                counts.answered.fetch_add(1, Ordering::SeqCst);
                frame(HEADERS, END_STREAM | END_HEADERS, stream, &[STATUS_200])
            }
            // Window updates, pings, the request's DATA: nothing this peer needs to act on.
            _ => continue,
        };
        if io.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// A client that sends the preface and an empty SETTINGS, then only reads.
pub struct DeafClient {
    io: TcpStream,
}

/// What a [`DeafClient`] saw the server send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    GoAway,
    Ping,
    Other(u8),
}

impl DeafClient {
    pub async fn connect(addr: SocketAddr) -> DeafClient {
        let mut io = TcpStream::connect(addr).await.expect("connect");
        io.write_all(PREFACE).await.expect("write the preface");
        io.write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("write SETTINGS");
        DeafClient { io }
    }

    /// The next frame's kind, or `None` once the server has closed the connection.
    pub async fn next(&mut self) -> Option<Seen> {
        let (kind, _, _) = read_frame(&mut self.io).await.ok()?;
        Some(match kind {
            GOAWAY => Seen::GoAway,
            PING => Seen::Ping,
            other => Seen::Other(other),
        })
    }
}

/// Reads one frame (RFC 9113 4.1) and returns its type, flags and stream id.
async fn read_frame(io: &mut TcpStream) -> std::io::Result<(u8, u8, u32)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok((head[3], head[4], stream))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}
