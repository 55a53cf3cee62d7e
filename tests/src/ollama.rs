//! A fake Ollama: `/api/generate` and `/api/chat` stream NDJSON, `/v1/chat/completions` and
//! `/v1/completions` stream SSE, `/api/tags`, `/api/version` and `/api/ps` answer at once. With
//! `"stream": false` (the default for the OpenAI paths, as in Ollama) a generation answers one
//! JSON object when it ends, in the shape the official clients parse. Like
//! the real server with `OLLAMA_NUM_PARALLEL`, it serves at most `parallel` generations at once,
//! and it fails loudly (500, and [`FakeOllama::assert_never_overlapped`]) if it ever sees more.
//! The one exception is a caller hanging up: no client can tell when Ollama has noticed, so a
//! generation that arrives while a hung-up one is still being torn down waits for its slot, as
//! real Ollama queues it.
//!
//! A generation is named by the `"prompt"` field of its JSON body; tests put the caller's name
//! there and read back the order in which Ollama started them.
//!
//! ```ignore
//! let ollama = ollama::fake().hold().run().await; // each chunk waits for release(1)
//! let fast = ollama::fake().chunks(2).run().await; // streams at once
//! ```

use crate::body::{self, Body, BodySender};
use crate::bounded;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Configures a fake Ollama before it starts.
#[derive(Debug)]
pub struct Builder {
    parallel: usize,
    chunks: usize,
    chunk_delay: Duration,
    hold: bool,
}

/// A running fake Ollama; dropping it closes every connection.
#[derive(Debug)]
pub struct FakeOllama {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

/// One generation as Ollama saw it.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt: String,
    pub path: String,
    pub body: Value,
    pub started: Instant,
    /// When the last chunk was handed over; `None` while running or when the caller left.
    pub ended: Option<Instant>,
}

#[derive(Debug)]
struct State {
    parallel: usize,
    chunks: usize,
    chunk_delay: Duration,
    /// `Some` when each chunk waits for a permit from [`FakeOllama::release`].
    gate: Option<Semaphore>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    overlaps: AtomicU64,
    generations: Mutex<Vec<Generation>>,
    started: watch::Sender<u64>,
    ended: watch::Sender<u64>,
    /// Generations whose caller went away before the end.
    abandoned: watch::Sender<u64>,
}

pub fn fake() -> Builder {
    Builder {
        parallel: 1,
        chunks: 3,
        chunk_delay: Duration::ZERO,
        hold: false,
    }
}

// === impl Builder ===

impl Builder {
    /// Generations served at once before the fake reports an overlap (default 1).
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = n;
        self
    }

    /// Token chunks per generation, before the final `done` chunk (default 3).
    pub fn chunks(mut self, n: usize) -> Self {
        self.chunks = n;
        self
    }

    /// Time to produce each token chunk: the model's speed, part of the scenario.
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Each chunk (the final one included) waits for [`FakeOllama::release`].
    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    pub async fn run(self) -> FakeOllama {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake ollama on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake ollama local addr");
        let state = Arc::new(State {
            parallel: self.parallel,
            chunks: self.chunks,
            chunk_delay: self.chunk_delay,
            gate: self.hold.then(|| Semaphore::new(0)),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            overlaps: AtomicU64::new(0),
            generations: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
            ended: watch::Sender::new(0),
            abandoned: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        FakeOllama {
            addr,
            state,
            accept,
        }
    }
}

// === impl FakeOllama ===

impl FakeOllama {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets `n` held chunks go (see [`Builder::hold`]); a generation takes `chunks + 1`.
    pub fn release(&self, n: usize) {
        self.state
            .gate
            .as_ref()
            .expect("release() on a fake built without hold()")
            .add_permits(n);
    }

    /// Chunks one whole generation needs.
    pub fn chunks_per_generation(&self) -> usize {
        self.state.chunks + 1
    }

    /// Every generation started so far, in order.
    pub fn generations(&self) -> Vec<Generation> {
        self.state
            .generations
            .lock()
            .expect("generations lock")
            .clone()
    }

    /// The prompts of the generations started so far, in order.
    pub fn prompts(&self) -> Vec<String> {
        self.generations().into_iter().map(|g| g.prompt).collect()
    }

    /// The most generations ever in flight at once, counting one waiting for a slot.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Panics if more than `parallel` generations ever ran at once.
    pub fn assert_never_overlapped(&self) {
        let overlaps = self.state.overlaps.load(Ordering::SeqCst);
        assert_eq!(
            overlaps,
            0,
            "fake ollama saw {overlaps} generation(s) beyond parallel = {} (max in flight {})",
            self.state.parallel,
            self.max_in_flight()
        );
    }

    pub async fn wait_started(&self, n: u64) {
        wait(&self.state.started, n, "generations to start").await;
    }

    pub async fn wait_ended(&self, n: u64) {
        wait(&self.state.ended, n, "generations to end").await;
    }

    pub async fn wait_abandoned(&self, n: u64) {
        wait(
            &self.state.abandoned,
            n,
            "generations abandoned by their caller",
        )
        .await;
    }
}

async fn wait(tx: &watch::Sender<u64>, n: u64, what: &str) {
    let mut rx = tx.subscribe();
    bounded(
        &format!("{n} {what} at fake ollama"),
        rx.wait_for(|v| *v >= n),
    )
    .await
    .expect("fake ollama state outlives its server");
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// === serving ===

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Generate,
    Chat,
    Sse,
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let format = match path.as_str() {
        "/api/tags" => {
            return Ok(json(
                200,
                r#"{"models":[{"name":"fake:latest","model":"fake:latest"}]}"#,
            ))
        }
        "/api/version" => return Ok(json(200, r#"{"version":"0.0.0-fake"}"#)),
        "/api/ps" => return Ok(json(200, r#"{"models":[]}"#)),
        "/api/generate" => Format::Generate,
        "/api/chat" => Format::Chat,
        "/v1/chat/completions" | "/v1/completions" => Format::Sse,
        _ => return Ok(json(404, r#"{"error":"not found"}"#)),
    };
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json(400, r#"{"error":"body"}"#)),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let prompt = body["prompt"].as_str().unwrap_or("").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(format != Format::Sse);

    if !take_slot(&state).await {
        state.overlaps.fetch_add(1, Ordering::SeqCst);
        eprintln!(
            "FAKE OLLAMA: {} generations at once with parallel = {}",
            state.parallel + 1,
            state.parallel
        );
        return Ok(json(
            500,
            r#"{"error":"fake ollama: more generations than parallel"}"#,
        ));
    }
    let index = {
        let mut g = state.generations.lock().expect("generations lock");
        g.push(Generation {
            prompt,
            path,
            body,
            started: Instant::now(),
            ended: None,
        });
        g.len() - 1
    };
    state.started.send_modify(|n| *n += 1);

    let (tx, rsp_body) = body::channel();
    tokio::spawn(generate(state, index, format, stream, tx));
    let content_type = match format {
        _ if !stream => "application/json",
        Format::Sse => "text/event-stream",
        _ => "application/x-ndjson",
    };
    let mut rsp = Response::new(rsp_body);
    rsp.headers_mut()
        .insert(CONTENT_TYPE, content_type.parse().expect("content type"));
    Ok(rsp)
}

/// Takes one of the `parallel` slots; false when the gateway sent more generations than that.
///
/// The gateway frees a slot the moment its caller hangs up and may send the next generation
/// before this server has seen the hang-up (the two travel on different connections and
/// tasks). So a generation that finds every slot busy waits: a hang-up that frees a slot
/// meanwhile excuses it; a generation ending normally does not, since its end is counted here
/// before the gateway can see it. Without hang-ups, any wait is an overlap. (With `parallel` >
/// 1, a normal end racing a hang-up's teardown would be miscounted; no scenario has both.)
async fn take_slot(state: &State) -> bool {
    // Subscribed before the first look, so nothing that frees a slot after it is missed.
    let mut abandoned = state.abandoned.subscribe();
    let mut ended = state.ended.subscribe();
    loop {
        let busy = state.in_flight.load(Ordering::SeqCst);
        if busy < state.parallel {
            let taken = state.in_flight.compare_exchange(
                busy,
                busy + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if taken.is_ok() {
                state.max_in_flight.fetch_max(busy + 1, Ordering::SeqCst);
                return true;
            }
            continue;
        }
        // More than `parallel` are here at once, whatever excuses it below.
        state.max_in_flight.fetch_max(busy + 1, Ordering::SeqCst);
        eprintln!("FAKE OLLAMA: a generation waits, all {busy} slots busy");
        tokio::select! {
            biased;
            changed = abandoned.changed() => {
                changed.expect("fake ollama state outlives its connections");
            }
            changed = ended.changed() => {
                changed.expect("fake ollama state outlives its connections");
                return false;
            }
        }
    }
}

/// Streams one generation; counts it ended (before the body ends, so the next request never
/// sees it still in flight) or abandoned when the caller goes away.
async fn generate(state: Arc<State>, index: usize, format: Format, stream: bool, tx: BodySender) {
    let mut whole = String::new();
    for i in 0..=state.chunks {
        if let Some(gate) = &state.gate {
            tokio::select! {
                permit = gate.acquire() => permit.expect("gate never closes").forget(),
                () = tx.closed() => return abandon(&state),
            }
        }
        let done = i == state.chunks;
        if !done && !state.chunk_delay.is_zero() {
            tokio::time::sleep(state.chunk_delay).await;
        }
        let chunk = match stream {
            true => chunk(format, i, done),
            false if done => answer(format, &whole),
            false => {
                whole.push_str(&format!("tok{i} "));
                continue;
            }
        };
        if done {
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            state.generations.lock().expect("generations lock")[index].ended = Some(Instant::now());
            state.ended.send_modify(|n| *n += 1);
        }
        if tx.try_send(chunk).is_err() {
            if !done {
                abandon(&state);
            }
            return;
        }
    }
}

fn abandon(state: &State) {
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    state.abandoned.send_modify(|n| *n += 1);
}

/// A whole, unstreamed answer.
fn answer(format: Format, text: &str) -> Bytes {
    let v = match format {
        Format::Generate => serde_json::json!({
            "model": "fake", "created_at": "2026-01-01T00:00:00Z", "response": text,
            "done": true, "done_reason": "stop",
        }),
        Format::Chat => serde_json::json!({
            "model": "fake", "created_at": "2026-01-01T00:00:00Z",
            "message": { "role": "assistant", "content": text },
            "done": true, "done_reason": "stop",
        }),
        Format::Sse => serde_json::json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": { "role": "assistant", "content": text },
            }],
        }),
    };
    Bytes::from(v.to_string())
}

fn chunk(format: Format, i: usize, done: bool) -> Bytes {
    let token = if done {
        String::new()
    } else {
        format!("tok{i} ")
    };
    // Like Ollama, the final chunk reports the tokens read (a fixed 7 here) and generated.
    let counts = if done {
        format!("\"prompt_eval_count\":7,\"eval_count\":{i},")
    } else {
        String::new()
    };
    let text = match format {
        Format::Generate => format!(
            "{{\"model\":\"fake\",\"response\":{token:?},{counts}\"done\":{done}}}\n"
        ),
        Format::Chat => format!(
            "{{\"model\":\"fake\",\"message\":{{\"role\":\"assistant\",\"content\":{token:?}}},{counts}\"done\":{done}}}\n"
        ),
        Format::Sse if done => "data: [DONE]\n\n".to_owned(),
        Format::Sse => format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{token:?}}}}}],\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"fake\"}}\n\n"
        ),
    };
    Bytes::from(text)
}

fn json(status: u16, text: &'static str) -> Response<Body> {
    let mut rsp = Response::new(body::full(text));
    *rsp.status_mut() = StatusCode::from_u16(status).expect("status");
    rsp.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("content type"),
    );
    rsp
}

/// The `[ollama...]` snapshot text for a gateway: `parallel`, the queue timeout and any extra
/// lines under `[ollama.gateway]`.
pub fn gateway_policy(parallel: usize, queue_timeout: &str, extra: &str) -> String {
    format!(
        "\n[ollama.gateway]\nparallel = {parallel}\nqueue_timeout = {queue_timeout:?}\n{extra}\n"
    )
}
