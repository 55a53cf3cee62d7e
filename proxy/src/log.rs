//! JSON log lines on stdout, written by a background thread so no request waits on the
//! terminal or the container runtime's pipe. Each runtime thread gathers its lines in a local
//! batch and hands the batch over when it is large, old, or the thread goes idle, so a busy
//! proxy pays one channel send per few dozen lines. Access lines skip `tracing`'s formatter:
//! they are one per request, so they are written by hand.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A batch is handed to the writer at this size...
const BATCH_BYTES: usize = 16 * 1024;
/// ...or when its first line is this old.
const BATCH_AGE: Duration = Duration::from_millis(50);
/// Batches waiting for the writer; beyond this, lines are dropped and counted.
const QUEUE: usize = 1024;

/// Where lines go; set once by [`init`]. Without it (a library embedding the proxy, the tests)
/// requests are still counted in metrics but not logged.
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    tx: SyncSender<Vec<u8>>,
    dropped: AtomicU64,
}

struct Batch {
    buf: Vec<u8>,
    first: Option<Instant>,
}

thread_local! {
    static BATCH: RefCell<Batch> = const { RefCell::new(Batch { buf: Vec::new(), first: None }) };
}

/// Flushes every line written so far when dropped; keep it alive until exit.
pub struct LogGuard {
    writer: Option<JoinHandle<()>>,
}

/// Installs the global subscriber and the writer thread.
pub fn init(level: &str) -> LogGuard {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let writer = std::thread::Builder::new()
        .name("mesh-log".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            // An empty batch is the guard's signal that every line has been handed over.
            while let Ok(batch) = rx.recv() {
                if batch.is_empty() {
                    break;
                }
                let _ = out.write_all(&batch);
                let _ = out.flush();
            }
        })
        .ok();
    let _ = SINK.set(Sink {
        tx,
        dropped: AtomicU64::new(0),
    });
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(|| EventWriter)
        .finish()
        .with(filter(std::env::var("MESH_LOG").ok().as_deref(), level))
        .init();
    LogGuard { writer }
}

/// `target=level` directives (`info,mesh_proxy::outbound=debug`): `MESH_LOG` if it parses,
/// else the bootstrap's level, else `info`. `Targets` rather than `EnvFilter`: the same
/// directives without a regex engine in the binary.
fn filter(env: Option<&str>, level: &str) -> Targets {
    env.and_then(|e| e.parse().ok())
        .or_else(|| level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_thread();
        if let (Some(sink), Some(writer)) = (SINK.get(), self.writer.take()) {
            if sink.tx.send(Vec::new()).is_ok() {
                let _ = writer.join();
            }
        }
    }
}

/// Lines dropped because the writer thread fell behind.
pub fn dropped_lines() -> Option<u64> {
    SINK.get().map(|s| s.dropped.load(Ordering::Relaxed))
}

/// Hands this thread's batch to the writer.
pub fn flush_thread() {
    flush(|_| true);
}

/// Runtime threads call this before they park: the batch goes once it is old enough, so an
/// idle proxy's lines leave within a timer tick or so, while a busy one, which parks between
/// almost every pair of requests, still hands over one batch per 16 KiB or 50 ms rather than
/// waking the writer each time.
pub fn flush_if_due() {
    flush(|b| b.first.is_some_and(|t| t.elapsed() >= BATCH_AGE));
}

fn flush(due: impl FnOnce(&Batch) -> bool) {
    let Some(sink) = SINK.get() else { return };
    // `try_with`: a thread being torn down may already have dropped its batch.
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if due(&b) {
                send(sink, &mut b);
            }
        }
    });
}

fn send(sink: &Sink, b: &mut Batch) {
    if b.buf.is_empty() {
        return;
    }
    let batch = std::mem::replace(&mut b.buf, Vec::with_capacity(BATCH_BYTES));
    b.first = None;
    if let Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) =
        sink.tx.try_send(batch)
    {
        let lines = batch.iter().filter(|&&c| c == b'\n').count() as u64;
        sink.dropped.fetch_add(lines, Ordering::Relaxed);
    }
}

/// Appends one finished line (ending in a newline) to this thread's batch.
pub(crate) fn write_access(line: &[u8]) {
    let Some(sink) = SINK.get() else { return };
    let _ = BATCH.try_with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else {
            return;
        };
        if b.buf.capacity() == 0 {
            b.buf.reserve(BATCH_BYTES);
        }
        b.buf.extend_from_slice(line);
        let now = Instant::now();
        let first = *b.first.get_or_insert(now);
        if b.buf.len() >= BATCH_BYTES || now.duration_since(first) >= BATCH_AGE {
            send(sink, &mut b);
        }
    });
}

pub(crate) fn access_enabled() -> bool {
    SINK.get().is_some()
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(sink) = SINK.get() {
            send(sink, self);
        }
    }
}

/// `tracing`'s writer: an event joins this thread's batch, which is handed over at once,
/// since events are rare and should not wait behind access lines.
struct EventWriter;

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if SINK.get().is_some() {
            let _ = BATCH.try_with(|b| {
                if let Ok(mut b) = b.try_borrow_mut() {
                    b.buf.extend_from_slice(buf);
                }
            });
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        flush_thread();
    }
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

/// Appends `n` in decimal.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `n` in decimal, left-padded with zeros to `width` digits.
pub(crate) fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    // Digits fill a zeroed buffer from the right; the padding is what is left of it (a
    // splice into `out` costs more than the formatting itself).
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i.min(buf.len().saturating_sub(width))..]);
}

/// Appends `t` as RFC 3339 UTC with microseconds, e.g. `2026-11-25T13:44:46.185325Z`.
pub(crate) fn rfc3339_micros(out: &mut Vec<u8>, t: std::time::SystemTime) {
    thread_local! {
        /// The last second formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`: the lines
        /// of one second share it.
        static SECOND: Cell<(u64, [u8; 32], usize)> = const { Cell::new((0, [0; 32], 0)) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|second| {
        let (cached, text, len) = second.get();
        if cached == secs && len > 0 {
            out.extend_from_slice(&text[..len]);
            return;
        }
        let start = out.len();
        push_date_time(out, secs);
        let written = &out[start..];
        if written.len() <= 32 {
            let mut text = [0u8; 32];
            text[..written.len()].copy_from_slice(written);
            second.set((secs, text, written.len()));
        }
    });
    out.push(b'.');
    push_padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// Appends `YYYY-MM-DDTHH:MM:SS` (UTC) for `secs` since the Unix epoch.
fn push_date_time(out: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    push_padded(out, year as u64, 4);
    out.push(b'-');
    push_padded(out, month as u64, 2);
    out.push(b'-');
    push_padded(out, day as u64, 2);
    out.push(b'T');
    push_padded(out, rem / 3600, 2);
    out.push(b':');
    push_padded(out, rem % 3600 / 60, 2);
    out.push(b':');
    push_padded(out, rem % 60, 2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_humantime() {
        use std::time::{Duration, UNIX_EPOCH};
        for secs in [
            0u64,
            951_782_400,
            1_700_000_000,
            1_795_000_123,
            4_102_444_799,
        ] {
            // The second line of a second reuses the first one's date and time.
            for micros in [123_456, 7] {
                let t = UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
                let mut out = Vec::new();
                rfc3339_micros(&mut out, t);
                let want = humantime::format_rfc3339_micros(t).to_string();
                assert_eq!(String::from_utf8(out).unwrap(), want);
            }
        }
    }

    #[test]
    fn numbers_are_decimal() {
        let mut out = Vec::new();
        push_u64(&mut out, 0);
        out.push(b' ');
        push_u64(&mut out, u64::MAX);
        out.push(b' ');
        push_padded(&mut out, 7, 3);
        assert_eq!(out, b"0 18446744073709551615 007");
    }

    #[test]
    fn strings_are_escaped_as_json() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}e/é");
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}e/é");
    }

    #[test]
    fn mesh_log_wins_and_a_bad_directive_falls_back_to_the_level_then_info() {
        use tracing::Level;
        let f = filter(Some("info,mesh_proxy::outbound=debug"), "warn");
        assert!(f.would_enable("mesh_proxy::outbound::retry", &Level::DEBUG));
        assert!(!f.would_enable("hyper", &Level::DEBUG));
        let f = filter(Some("mesh_proxy=[nonsense"), "warn");
        assert!(!f.would_enable("mesh_proxy", &Level::INFO));
        assert!(f.would_enable("mesh_proxy", &Level::WARN));
        let f = filter(None, "=?=");
        assert!(f.would_enable("mesh_proxy", &Level::INFO));
        assert!(!f.would_enable("mesh_proxy", &Level::DEBUG));
    }
}
