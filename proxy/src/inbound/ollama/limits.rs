//! An agent's Ollama limits applied to its request body (Rules 23-24): an omitted
//! `options.num_ctx` / `options.num_predict` (OpenAI API: `max_tokens`) gets the agent's limit,
//! a larger one is refused. A body that needs no change is forwarded byte for byte.

use bytes::Bytes;
use mesh_config::ollama::AgentLimits;
use serde_json::{Map, Value};

/// Which API a path belongs to, for what the gateway does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/api/tags`, `/api/version`, `/api/ps`: answered at once, never queued.
    Bypass,
    /// `/api/generate`, `/api/chat`: limits in `options`.
    Native,
    /// `/v1/chat/completions`, `/v1/completions`: `max_tokens` at the top level.
    OpenAi,
    /// Anything else that uses the model (embeddings, show, pull): queued, unchanged.
    Other,
}

impl Api {
    pub fn of(path: &str) -> Api {
        match path.trim_end_matches('/') {
            "/api/tags" | "/api/version" | "/api/ps" => Api::Bypass,
            "/api/generate" | "/api/chat" => Api::Native,
            "/v1/chat/completions" | "/v1/completions" => Api::OpenAi,
            _ => Api::Other,
        }
    }
}

/// Applies `limits` of `agent` to a body of `api`; the error is the message for a 400.
pub fn apply(api: Api, agent: &str, limits: &AgentLimits, body: Bytes) -> Result<Bytes, String> {
    let needed = match api {
        Api::Native => limits.max_context_size.is_some() || limits.max_tokens.is_some(),
        // The OpenAI API has no context size; Ollama uses the model's.
        Api::OpenAi => limits.max_tokens.is_some(),
        Api::Bypass | Api::Other => false,
    };
    if !needed {
        return Ok(body);
    }
    let mut doc: Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|e| format!("request body is not a JSON object: {e}"))?;
    let mut changed = false;
    match api {
        Api::Native => {
            let options = doc
                .entry("options")
                .or_insert_with(|| Value::Object(Map::new()));
            if options.is_null() {
                *options = Value::Object(Map::new());
            }
            let Some(options) = options.as_object_mut() else {
                return Err("\"options\" must be a JSON object".into());
            };
            let (ctx, tokens) = (limits.max_context_size, limits.max_tokens);
            changed |= limit_one(
                options,
                "options.",
                "num_ctx",
                ctx,
                "max_context_size",
                agent,
            )?;
            changed |= limit_one(
                options,
                "options.",
                "num_predict",
                tokens,
                "max_tokens",
                agent,
            )?;
        }
        _ => {
            // `max_completion_tokens` is the newer name for `max_tokens`: check it, fill the
            // older one only when neither is given.
            if let (Some(limit), Some(_)) = (limits.max_tokens, doc.get("max_completion_tokens")) {
                check(
                    &doc,
                    "",
                    "max_completion_tokens",
                    limit,
                    "max_tokens",
                    agent,
                )?;
            } else {
                changed |= limit_one(
                    &mut doc,
                    "",
                    "max_tokens",
                    limits.max_tokens,
                    "max_tokens",
                    agent,
                )?;
            }
        }
    }
    if !changed {
        return Ok(body);
    }
    serde_json::to_vec(&doc)
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode the request body: {e}"))
}

/// Fills `key` with `limit` when absent; refuses a value above it. True when it filled.
fn limit_one(
    obj: &mut Map<String, Value>,
    prefix: &str,
    key: &str,
    limit: Option<u32>,
    name: &str,
    agent: &str,
) -> Result<bool, String> {
    let Some(limit) = limit else {
        return Ok(false);
    };
    match obj.get(key) {
        None | Some(Value::Null) => {
            obj.insert(key.to_owned(), Value::from(limit));
            Ok(true)
        }
        Some(_) => check(obj, prefix, key, limit, name, agent).map(|()| false),
    }
}

fn check(
    obj: &Map<String, Value>,
    prefix: &str,
    key: &str,
    limit: u32,
    name: &str,
    agent: &str,
) -> Result<(), String> {
    let value = obj.get(key).and_then(Value::as_i64);
    match value {
        Some(n) if n >= 1 && n <= i64::from(limit) => Ok(()),
        Some(n) if n >= 1 => Err(format!(
            "{prefix}{key} {n} is above {agent}'s {name} {limit}"
        )),
        // Ollama reads -1 and -2 as "no limit".
        Some(n) => Err(format!(
            "{prefix}{key} {n} asks for no limit; {agent}'s {name} is {limit}"
        )),
        None => Err(format!("{prefix}{key} must be an integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> AgentLimits {
        AgentLimits {
            max_context_size: Some(4096),
            max_tokens: Some(512),
            ..Default::default()
        }
    }

    fn run(api: Api, body: Value) -> Result<Value, String> {
        let out = apply(
            api,
            "senior-ai-engineer",
            &limits(),
            Bytes::from(body.to_string()),
        )?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn omitted_options_get_the_agent_defaults() {
        let out = run(Api::Native, json!({"model": "m", "prompt": "hi"})).unwrap();
        assert_eq!(out["options"], json!({"num_ctx": 4096, "num_predict": 512}));
        let out = run(
            Api::Native,
            json!({"model": "m", "options": {"num_ctx": 1024}}),
        )
        .unwrap();
        assert_eq!(out["options"], json!({"num_ctx": 1024, "num_predict": 512}));
        let out = run(Api::OpenAi, json!({"model": "m", "messages": []})).unwrap();
        assert_eq!(out["max_tokens"], 512);
    }

    #[test]
    fn values_above_the_limit_are_refused_with_a_clear_message() {
        let err = run(Api::Native, json!({"options": {"num_ctx": 8192}})).unwrap_err();
        assert_eq!(
            err,
            "options.num_ctx 8192 is above senior-ai-engineer's max_context_size 4096"
        );
        let err = run(Api::Native, json!({"options": {"num_predict": -1}})).unwrap_err();
        assert!(err.contains("asks for no limit"), "{err}");
        let err = run(Api::OpenAi, json!({"max_completion_tokens": 513})).unwrap_err();
        assert!(err.contains("513 is above"), "{err}");
        let err = run(Api::Native, json!({"options": "big"})).unwrap_err();
        assert!(err.contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn a_body_within_limits_passes_byte_for_byte() {
        let body = Bytes::from_static(br#"{ "options": {"num_ctx": 10, "num_predict": 5} }"#);
        let out = apply(Api::Native, "a", &limits(), body.clone()).unwrap();
        assert_eq!(out, body);
        let out = apply(
            Api::Native,
            "a",
            &AgentLimits::default(),
            Bytes::from_static(b"x"),
        );
        assert_eq!(
            out.unwrap(),
            Bytes::from_static(b"x"),
            "no limits: not even parsed"
        );
    }

    #[test]
    fn paths_map_to_apis() {
        assert_eq!(Api::of("/api/tags"), Api::Bypass);
        assert_eq!(Api::of("/api/chat"), Api::Native);
        assert_eq!(Api::of("/v1/chat/completions"), Api::OpenAi);
        assert_eq!(Api::of("/api/embed"), Api::Other);
    }
}
