//! `mesh-proxy [--config FILE]`: parse arguments, build the runtime, handle signals.

use mesh_proxy::app;
use mesh_proxy::bootstrap::Bootstrap;
use std::path::PathBuf;
use std::process::ExitCode;

// Per-request allocations (headers, futures, buffers) dominate allocator traffic; mimalloc's
// thread-local free lists cost a fraction of glibc's arenas for them, and hold less idle memory.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: mesh-proxy [--config FILE]\n\
    Runs the agent mesh sidecar. Without --config, uses the embedded local default.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(path) => config = Some(path.into()),
                None => return usage_error("--config needs a file"),
            },
            "--version" | "-V" => {
                println!("mesh-proxy {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    let boot = match config {
        Some(path) => match Bootstrap::from_file(&path) {
            Ok(boot) => boot,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::from(2);
            }
        },
        None => Bootstrap::embedded(),
    };
    let _log = mesh_proxy::log::init(&boot.log.level);

    // One worker: a single-threaded scheduler on the main thread, with no work-stealing
    // bookkeeping and no cross-thread wakeups; a sidecar given one core spends it on requests.
    let mut rt = match boot.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                rt.worker_threads(n);
            }
            rt
        }
    };
    let rt = match rt
        .enable_all()
        .thread_name("mesh-proxy")
        .on_thread_park(|| {
            mesh_proxy::log::flush_if_due();
            collect_if_due();
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(boot))
}

async fn run(boot: Bootstrap) -> ExitCode {
    // Handlers first: a SIGTERM that arrives while the proxy starts must drain, not kill.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let running = match app::start(boot).await {
        Ok(running) => running,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("mesh-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let first = signals.next().await;
    tracing::info!(signal = first, "shutdown requested");
    tokio::select! {
        _ = running.shutdown() => ExitCode::SUCCESS,
        second = signals.next() => {
            tracing::warn!(signal = second, "second signal; exiting without finishing the drain");
            ExitCode::from(1)
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

thread_local! {
    static COLLECTED: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Hands memory this thread freed back to the OS, at most once a second, when the thread goes
/// idle: mimalloc otherwise keeps the pages a flood of connections used, and the sidecar would
/// stay at its peak size.
fn collect_if_due() {
    let now = std::time::Instant::now();
    let due = COLLECTED.with(|last| match last.get() {
        Some(t) if now.duration_since(t) < std::time::Duration::from_secs(1) => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: mi_collect only walks and frees this thread's own heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("mesh-proxy: {msg}\n{USAGE}");
    ExitCode::from(2)
}
