//! Looks at a connection's first byte before handing it to the HTTP server, so TLS or binary
//! protocols sent to a plain-HTTP port are closed and counted rather than answered with 400.

use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line or the HTTP/2 preface (`PRI * HTTP/2.0`).
    Http,
    /// A TLS handshake record (a ClientHello).
    Tls,
    Unknown(u8),
    /// Closed, or silent until the timeout: nothing to serve.
    Nothing,
}

/// The content type of a TLS handshake record, the first byte a TLS client sends.
const TLS_HANDSHAKE: u8 = 0x16;

/// Waits for the first byte without consuming it.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => classify(first[0]),
        _ => Detected::Nothing,
    }
}

/// What a connection carries, by the first byte it sent.
pub fn classify(first: u8) -> Detected {
    match first {
        // A request line starts with its method, a token in capitals (`PRI` for the HTTP/2
        // preface), after any empty lines a client sent first: a server should skip them
        // (RFC 9112 2.2), as hyper's parser does.
        b'A'..=b'Z' | b'\r' | b'\n' => Detected::Http,
        TLS_HANDSHAKE => Detected::Tls,
        other => Detected::Unknown(other),
    }
}
