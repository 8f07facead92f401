//! Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, OpenAI) as
//! a [`LanguageModel`]: chat completions streamed over SSE, with timeouts,
//! retries (exponential backoff with jitter, honouring `Retry-After`) on
//! 429, 5xx and connection errors, and typed errors for context-length and
//! content-filter refusals. An error never becomes text.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use lw_core::FinishReason;
use serde_json::{json, Value};

use crate::model::{ChatRequest, ChatResponse, LanguageModel, ModelCallError, Traffic, Usage};

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub api_base: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Retries after the first attempt for transient failures.
    pub retries: usize,
    /// First backoff; doubled per retry, with jitter.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response.
    pub read_timeout: Duration,
    /// Context size to ask for (`options.num_ctx`, for Ollama, which
    /// otherwise truncates prompts at 2,048 tokens).
    pub context_size: Option<usize>,
    /// Which server's fields carry structured decoding and length control.
    pub flavor: ApiFlavor,
}

/// The kind of OpenAI-compatible server, for the fields beyond OpenAI's
/// API: grammars, `min_tokens`, DRY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiFlavor {
    /// OpenAI itself (api.openai.com) gets OpenAI's fields only; any other
    /// server gets llama.cpp's, which longwriter's own server also reads.
    #[default]
    Auto,
    /// llama.cpp's `llama-server` (and longwriter's): `grammar`,
    /// `json_schema`, `min_tokens`, `dry_*`.
    LlamaCpp,
    /// vLLM: `structured_outputs`, `min_tokens`.
    Vllm,
    /// SGLang: `ebnf`, `json_schema`, `min_tokens`.
    Sglang,
    /// OpenAI's fields only (`response_format` for JSON schemas); plans
    /// are parsed and re-asked as without structured decoding.
    OpenAi,
}

impl std::str::FromStr for ApiFlavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ApiFlavor::Auto,
            "llama.cpp" | "llama-cpp" | "llamacpp" => ApiFlavor::LlamaCpp,
            "vllm" => ApiFlavor::Vllm,
            "sglang" => ApiFlavor::Sglang,
            "openai" => ApiFlavor::OpenAi,
            _ => {
                return Err(format!(
                    "unknown API flavor \"{s}\": auto, llama.cpp, vllm, sglang or openai"
                ))
            }
        })
    }
}

impl ApiFlavor {
    /// The flavor for `api_base`: `Auto` resolved.
    fn resolve(self, api_base: &str) -> ApiFlavor {
        match self {
            ApiFlavor::Auto if api_base.contains("api.openai.com") => ApiFlavor::OpenAi,
            ApiFlavor::Auto => ApiFlavor::LlamaCpp,
            f => f,
        }
    }
}

/// A token count past any context, for llama.cpp's `repeat_last_n` and
/// `dry_penalty_last_n` where the whole sequence is meant (its server takes
/// no -1 there). Its samplers keep buffers of this many token ids: about
/// 1.5 MiB a request with both.
const WHOLE_SEQUENCE: usize = 1 << 17;

impl HttpOptions {
    pub fn new(api_base: impl Into<String>, model: impl Into<String>) -> Self {
        HttpOptions {
            api_base: api_base.into(),
            model: model.into(),
            api_key: None,
            retries: 5,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(300),
            context_size: None,
            flavor: ApiFlavor::Auto,
        }
    }
}

pub struct HttpModel {
    opts: HttpOptions,
    agent: ureq::Agent,
    jitter: u64,
    /// Body bytes sent and received so far, retries and errors included.
    traffic: std::cell::Cell<Traffic>,
    /// Tokens per word measured on the server, per language (English,
    /// Chinese), once asked.
    per_word: std::cell::Cell<[Option<Option<f64>>; 2]>,
}

/// A failed attempt: worth retrying or not.
enum Attempt {
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fail(ModelCallError),
}

impl HttpModel {
    pub fn new(opts: HttpOptions) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.connect_timeout)
            .timeout_read(opts.read_timeout)
            .build();
        HttpModel {
            opts,
            agent,
            jitter: 0x2545_F491_4F6C_DD1D,
            traffic: std::cell::Cell::new(Traffic::default()),
            per_word: std::cell::Cell::new([None; 2]),
        }
    }

    /// The server's token count of `text` from its `/tokenize` route
    /// (llama.cpp's, vLLM's and longwriter's, beside `/v1`), or `None` where
    /// it has none.
    fn remote_token_count(&self, text: &str) -> Option<usize> {
        let root = self.opts.api_base.trim_end_matches('/');
        let root = root.strip_suffix("/v1").unwrap_or(root);
        let body = json!({
            "content": text,
            "add_special": false,
            "prompt": text,
            "model": self.opts.model,
            "add_special_tokens": false,
        })
        .to_string();
        let mut req = self
            .agent
            .post(&format!("{root}/tokenize"))
            .set("Content-Type", "application/json");
        if let Some(key) = &self.opts.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        self.count(body.len(), 0);
        let answer = req.send_string(&body).ok()?.into_string().ok()?;
        self.count(0, answer.len());
        let v: Value = serde_json::from_str(&answer).ok()?;
        v["tokens"]
            .as_array()
            .map(Vec::len)
            .or_else(|| v["count"].as_u64().map(|n| n as usize))
    }

    fn count(&self, sent: usize, received: usize) {
        let t = self.traffic.get();
        self.traffic.set(Traffic {
            sent: t.sent + sent as u64,
            received: t.received + received as u64,
        });
    }

    fn body(&self, request: &ChatRequest) -> Value {
        let messages: Vec<Value> = request
            .messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        let s = &request.sampling;
        let mut body = json!({
            "model": self.opts.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        if let Some(n) = self.opts.context_size {
            body["options"] = json!({"num_ctx": n});
            body["num_ctx"] = json!(n);
        }
        self.extensions(request, &mut body);
        body
    }

    /// Structured decoding, `min_tokens` and DRY in the server's own
    /// fields (none for OpenAI, which has no grammars).
    fn extensions(&self, request: &ChatRequest, body: &mut Value) {
        use lw_core::Constraint;
        let flavor = self.opts.flavor.resolve(&self.opts.api_base);
        if flavor != ApiFlavor::OpenAi && request.min_tokens > 0 {
            body["min_tokens"] = json!(request.min_tokens);
        }
        // The push to end past the budget: longwriter's own field (llama.cpp
        // ignores fields it does not know; vLLM and SGLang are not sent it).
        if let (ApiFlavor::LlamaCpp, Some(n)) = (flavor, request.end_after) {
            body["end_after_tokens"] = json!(n);
        }
        let s = &request.sampling;
        if flavor != ApiFlavor::OpenAi && s.repetition_penalty != 1.0 {
            // llama.cpp's name, and vLLM's and SGLang's.
            body["repeat_penalty"] = json!(s.repetition_penalty);
            body["repetition_penalty"] = json!(s.repetition_penalty);
            if flavor == ApiFlavor::LlamaCpp {
                // llama.cpp penalizes its last 64 tokens unless told;
                // here the penalty covers prompt and answer.
                body["repeat_last_n"] = json!(WHOLE_SEQUENCE);
            }
        }
        if flavor == ApiFlavor::LlamaCpp {
            // llama.cpp's own defaults are top-k 40 and min-p 0.05; here
            // both are off unless asked (0).
            body["top_k"] = json!(s.top_k);
            body["min_p"] = json!(s.min_p);
        }
        if flavor == ApiFlavor::LlamaCpp && s.dry_multiplier > 0.0 {
            body["dry_multiplier"] = json!(s.dry_multiplier);
            body["dry_base"] = json!(s.dry_base);
            body["dry_allowed_length"] = json!(s.dry_allowed_length);
            // 0 means the whole sequence here, DRY off in llama.cpp.
            let last_n = match s.dry_penalty_last_n {
                0 => WHOLE_SEQUENCE,
                n => n,
            };
            body["dry_penalty_last_n"] = json!(last_n);
            body["dry_sequence_breakers"] = json!(s.dry_sequence_breakers);
        }
        let schema = |text: &str| serde_json::from_str::<Value>(text).ok();
        match (&request.constraint, flavor) {
            (None, _) => {}
            (Some(Constraint::Gbnf(g)), ApiFlavor::LlamaCpp) => body["grammar"] = json!(g),
            (Some(Constraint::Gbnf(g)), ApiFlavor::Vllm) => {
                body["structured_outputs"] = json!({"grammar": g})
            }
            (Some(Constraint::Gbnf(g)), ApiFlavor::Sglang) => body["ebnf"] = json!(g),
            (Some(Constraint::Regex(r)), ApiFlavor::Vllm) => {
                body["structured_outputs"] = json!({"regex": r})
            }
            (Some(Constraint::Regex(r)), ApiFlavor::Sglang) => body["regex"] = json!(r),
            (Some(Constraint::JsonSchema(text)), ApiFlavor::LlamaCpp) => {
                if let Some(v) = schema(text) {
                    body["json_schema"] = v;
                }
            }
            (Some(Constraint::JsonSchema(text)), _) => {
                if let Some(v) = schema(text) {
                    body["response_format"] = json!({"type": "json_schema",
                        "json_schema": {"name": "answer", "schema": v, "strict": true}});
                }
            }
            (Some(Constraint::JsonObject), _) => {
                body["response_format"] = json!({"type": "json_object"})
            }
            // A grammar this server has no field for: the answer is checked
            // after, as without structured decoding.
            (Some(_), _) => {}
        }
    }

    fn next_jitter(&mut self) -> f64 {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        (self.jitter % 1000) as f64 / 1000.0
    }

    fn attempt(
        &self,
        body: &Value,
        streamed: &mut bool,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, Attempt> {
        let url = format!(
            "{}/chat/completions",
            self.opts.api_base.trim_end_matches('/')
        );
        let mut req = self
            .agent
            .post(&url)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.opts.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let text = body.to_string();
        self.count(text.len(), 0);
        let response = match req.send_string(&text) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let after = r
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map(Duration::from_secs_f64);
                let text = r.into_string().unwrap_or_default();
                self.count(0, text.len());
                return Err(classify_status(code, &text, after));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Attempt::Retry {
                    reason: format!("cannot reach {url}: {t}"),
                    after: None,
                })
            }
        };
        let mut text = String::new();
        let mut finish = FinishReason::Stop;
        let mut usage = Usage::default();
        let reader = BufReader::new(response.into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| transient(*streamed, format!("the stream broke: {e}")))?;
            self.count(0, line.len() + 1);
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| {
                Attempt::Fail(ModelCallError::Backend(format!(
                    "the server sent invalid JSON ({e}): {data}"
                )))
            })?;
            if let Some(err) = v.get("error") {
                return Err(Attempt::Fail(error_from_body(err)));
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                usage.prompt_tokens = n("prompt_tokens");
                usage.completion_tokens = n("completion_tokens");
                usage.cached_prompt_tokens = u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as usize;
            }
            let Some(choice) = v.pointer("/choices/0") else {
                continue;
            };
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some("content_filter") => {
                    return Err(Attempt::Fail(ModelCallError::ContentFilter(
                        "the server stopped the answer (finish_reason content_filter)".into(),
                    )))
                }
                Some("length") => finish = FinishReason::Length,
                Some(_) => finish = FinishReason::Stop,
                None => {}
            }
            if let Some(delta) = choice.pointer("/delta/content").and_then(Value::as_str) {
                if !delta.is_empty() {
                    *streamed = true;
                    text.push_str(delta);
                    if !on_text(delta) {
                        return Err(Attempt::Fail(ModelCallError::Cancelled));
                    }
                }
            }
        }
        Ok(ChatResponse {
            text,
            finish_reason: finish,
            usage,
        })
    }
}

/// A failure after text was streamed cannot be retried transparently.
fn transient(streamed: bool, reason: String) -> Attempt {
    if streamed {
        Attempt::Fail(ModelCallError::Backend(reason))
    } else {
        Attempt::Retry {
            reason,
            after: None,
        }
    }
}

fn classify_status(code: u16, body: &str, after: Option<Duration>) -> Attempt {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
        let e = error_from_body(err);
        if matches!(
            e,
            ModelCallError::ContextLengthServer(_) | ModelCallError::ContentFilter(_)
        ) {
            return Attempt::Fail(e);
        }
    }
    let summary = format!(
        "HTTP {code}: {}",
        body.chars().take(300).collect::<String>()
    );
    match code {
        429 | 500..=599 => Attempt::Retry {
            reason: summary,
            after,
        },
        401 | 403 => Attempt::Fail(ModelCallError::Refused {
            status: code,
            message: format!("{summary} (check --api-key or OPENAI_API_KEY)"),
        }),
        400..=499 => Attempt::Fail(ModelCallError::Refused {
            status: code,
            message: summary,
        }),
        _ => Attempt::Fail(ModelCallError::Backend(summary)),
    }
}

/// OpenAI's error object → a typed error.
fn error_from_body(err: &Value) -> ModelCallError {
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let code = err.get("code").and_then(Value::as_str).unwrap_or("");
    let kind = err.get("type").and_then(Value::as_str).unwrap_or("");
    let lower = message.to_lowercase();
    if code == "context_length_exceeded"
        || lower.contains("maximum context length")
        || lower.contains("context length")
    {
        ModelCallError::ContextLengthServer(message)
    } else if code == "content_filter"
        || code == "content_policy_violation"
        || kind == "content_filter"
    {
        ModelCallError::ContentFilter(message)
    } else {
        ModelCallError::Backend(if message.is_empty() {
            err.to_string()
        } else {
            message
        })
    }
}

impl LanguageModel for HttpModel {
    fn name(&self) -> String {
        format!("{} at {}", self.opts.model, self.opts.api_base)
    }

    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    /// Measured with the server's tokenizer where it has a `/tokenize`
    /// route (llama.cpp, vLLM, longwriter), so sections get the same
    /// length control as on the local engine; OpenAI has none.
    fn tokens_per_word(&self, lang: crate::length::Language) -> Option<f64> {
        if self.opts.flavor.resolve(&self.opts.api_base) == ApiFlavor::OpenAi {
            return None;
        }
        let k = usize::from(lang == crate::length::Language::Chinese);
        let mut known = self.per_word.get();
        if let Some(v) = known[k] {
            return v;
        }
        let v = crate::model::tokens_per_word_by(lang, |t| self.remote_token_count(t));
        known[k] = Some(v);
        self.per_word.set(known);
        v
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let body = self.body(request);
        let mut last = String::new();
        for attempt in 0..=self.opts.retries {
            let mut streamed = false;
            match self.attempt(&body, &mut streamed, on_text) {
                Ok(r) => return Ok(r),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry { reason, after }) => {
                    last = reason;
                    if attempt == self.opts.retries {
                        break;
                    }
                    let base = self.opts.backoff.as_secs_f64() * 2f64.powi(attempt as i32);
                    let wait = after.map_or(base * (0.5 + self.next_jitter()), |a| a.as_secs_f64());
                    std::thread::sleep(Duration::from_secs_f64(wait.min(60.0)));
                }
            }
        }
        Err(ModelCallError::Backend(format!(
            "gave up after {} attempts: {last}",
            self.opts.retries + 1
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lw_core::{Message, SamplingParams};

    fn request(sampling: SamplingParams) -> ChatRequest {
        ChatRequest {
            messages: vec![Message::user("hi")],
            max_tokens: 8,
            sampling,
            stop: Vec::new(),
            constraint: None,
            min_tokens: 0,
            end_after: None,
        }
    }

    /// llama.cpp's server reads a window of 0 as "off" and defaults to a
    /// 64-token penalty window, top-k 40 and min-p 0.05: the body says
    /// what this client means instead; vLLM and OpenAI get none of it.
    #[test]
    fn llama_cpp_is_told_the_windows_and_the_filters_meant_here() {
        let sampling = SamplingParams {
            repetition_penalty: 1.1,
            dry_multiplier: 0.8,
            ..Default::default()
        };
        let body = |api_base: &str, flavor| {
            let mut opts = HttpOptions::new(api_base, "m");
            opts.flavor = flavor;
            HttpModel::new(opts).body(&request(sampling.clone()))
        };
        let b = body("http://127.0.0.1:8080/v1", ApiFlavor::Auto);
        assert_eq!(b["repeat_last_n"], json!(WHOLE_SEQUENCE));
        assert_eq!(b["dry_penalty_last_n"], json!(WHOLE_SEQUENCE));
        assert_eq!(b["top_k"], json!(0));
        assert_eq!(b["min_p"], json!(0.0));
        let windowed = SamplingParams {
            dry_penalty_last_n: 256,
            ..sampling.clone()
        };
        let mut opts = HttpOptions::new("http://127.0.0.1:8080/v1", "m");
        opts.flavor = ApiFlavor::LlamaCpp;
        let b = HttpModel::new(opts).body(&request(windowed));
        assert_eq!(b["dry_penalty_last_n"], json!(256));
        for (base, flavor) in [
            ("http://127.0.0.1:8000/v1", ApiFlavor::Vllm),
            ("https://api.openai.com/v1", ApiFlavor::Auto),
        ] {
            let b = body(base, flavor);
            for field in ["repeat_last_n", "dry_penalty_last_n", "top_k", "min_p"] {
                assert!(b.get(field).is_none(), "{field} sent to {base}");
            }
        }
    }
}
