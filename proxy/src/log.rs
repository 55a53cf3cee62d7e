//! JSON log lines on stdout, written by a background thread so no request waits on the
//! terminal or the container runtime's pipe. Access lines skip `tracing`'s formatter: they are
//! one per request, so they are written by hand into a reused buffer.

use std::io::Write;
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Where access lines go; set once by [`init`]. Without it (a library embedding the proxy, the
/// tests) requests are still counted in metrics but not logged.
static ACCESS: OnceLock<NonBlocking> = OnceLock::new();

/// Installs the global subscriber; keep the guard alive until exit to flush the last lines.
pub fn init(level: &str) -> WorkerGuard {
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(stdout);
    let _ = ACCESS.set(writer.clone());
    let filter = EnvFilter::try_from_env("MESH_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    guard
}

/// Lines dropped because the writer thread fell behind (the queue holds 128k lines).
pub fn dropped_lines() -> Option<ErrorCounter> {
    ACCESS.get().map(|w| w.error_counter())
}

/// Hands one finished line to the writer thread.
pub(crate) fn write_access(line: &[u8]) {
    if let Some(w) = ACCESS.get() {
        let _ = w.clone().write_all(line);
    }
}

pub(crate) fn access_enabled() -> bool {
    ACCESS.get().is_some()
}

/// Appends `s` as a JSON string (with quotes).
pub(crate) fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => {
                out.extend_from_slice(&bytes[start..i]);
                let _ = write!(out, "\\u{b:04x}");
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}e/é");
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}e/é");
    }
}
