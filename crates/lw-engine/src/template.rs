//! Chat templates: a model's own Jinja template (`tokenizer_config.json`,
//! `chat_template.jinja` or GGUF metadata) rendered as transformers'
//! `apply_chat_template` renders it with jinja2, and the built-in formats.
//!
//! minijinja does the rendering; `python` makes values print, serialize and
//! iterate as they do in Python, and `rewrite` adapts the two tags jinja2
//! reads differently. `tests/templates.rs` holds the result to jinja2's
//! output on llama.cpp's collection of real templates, byte for byte.
//! This module turns messages into prompt text; tokens are not its business.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use minijinja::value::Value;
use minijinja::value::{Kwargs, Rest};
use minijinja::{filters, Environment, Error as JinjaError, ErrorKind, State};

use lw_core::Message;

use crate::error::EngineError;

mod python;
mod rewrite;

/// Which chat format turns messages into a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatFormat {
    /// The checkpoint's own template; GLM-4 checkpoints without one get
    /// [`ChatFormat::Glm4`].
    #[default]
    Auto,
    /// The checkpoint's own template (an error if it has none).
    Template,
    /// GLM-4: `[gMASK]<sop>`, then `<|role|>` and a newline before each
    /// message, and a bare `<|assistant|>` to open the answer.
    Glm4,
    /// Llama-2 style `[INST]…[/INST]` turns, as LongWriter-llama3.1-8b was
    /// trained: BOS, each user turn in `[INST]`…`[/INST]`, each answer
    /// followed by EOS; a system message opens the first user turn inside
    /// `<<SYS>>`…`<</SYS>>`.
    Inst,
}

/// GLM-4's format as a template.
const GLM4: &str = "[gMASK]<sop>\
{%- for m in messages %}{{ '<|' ~ m.role ~ '|>\n' ~ m.content }}{% endfor %}\
{%- if add_generation_prompt %}<|assistant|>{% endif %}";

/// Llama-2 style turns as a template.
const INST: &str = "{{ bos_token }}\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none %}\
{%- for m in messages if m.role != 'system' %}\
{%- if m.role == 'user' %}[INST]\
{%- if loop.first and sys is not none %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}\
{{- m.content }}[/INST]\
{%- elif m.role == 'assistant' %}{{ m.content ~ eos_token }}\
{%- else %}{{ raise_exception('the [INST] format has no role ' ~ m.role) }}{% endif %}\
{%- endfor %}";

impl ChatFormat {
    pub fn parse(s: &str) -> Option<ChatFormat> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(ChatFormat::Auto),
            "template" => Some(ChatFormat::Template),
            "glm4" | "glm-4" | "chatglm" => Some(ChatFormat::Glm4),
            "inst" | "llama2" | "llama-2" => Some(ChatFormat::Inst),
            _ => None,
        }
    }

    /// The built-in template of this format (`None` for the checkpoint's own).
    pub fn builtin(self, bos_token: &str, eos_token: &str) -> Option<ChatTemplate> {
        let src = match self {
            ChatFormat::Glm4 => GLM4,
            ChatFormat::Inst => INST,
            ChatFormat::Auto | ChatFormat::Template => return None,
        };
        Some(ChatTemplate::new(src, bos_token, eos_token).expect("built-in templates compile"))
    }
}

/// GLM-4's end-of-turn tokens: EOS, and the markers of the next user or
/// tool turn, which the model emits when its answer is done.
pub const GLM4_STOP_TOKENS: &[&str] = &["<|endoftext|>", "<|user|>", "<|observation|>"];

/// What a template reads besides the messages, named as transformers'
/// `apply_chat_template` passes them.
#[derive(Debug, Clone, Default)]
pub struct TemplateInputs {
    /// Open the assistant's turn after the last message.
    pub add_generation_prompt: bool,
    /// Tool definitions (OpenAI-style JSON objects); `None` is Python's
    /// `tools=None`. Build them with [`parse_json`] to keep their key order.
    pub tools: Option<Value>,
    /// Further variables, such as `enable_thinking`.
    pub vars: Vec<(String, Value)>,
}

impl TemplateInputs {
    pub fn new(add_generation_prompt: bool) -> Self {
        TemplateInputs {
            add_generation_prompt,
            ..TemplateInputs::default()
        }
    }

    pub fn with_tools(mut self, tools: Value) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Sets a template variable, as a keyword argument of
    /// `apply_chat_template` does.
    pub fn with_var(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.vars.push((name.to_string(), value.into()));
        self
    }

    /// `enable_thinking`, which reasoning models' templates read.
    pub fn enable_thinking(self, yes: bool) -> Self {
        self.with_var("enable_thinking", yes)
    }

    /// Sets a template variable from a JSON value (a request's
    /// `chat_template_kwargs`).
    pub fn with_json_var(self, name: &str, value: &serde_json::Value) -> Result<Self, EngineError> {
        let v: Value = serde_json::from_value(value.clone())
            .map_err(|e| EngineError::Template(format!("chat_template_kwargs.{name}: {e}")))?;
        Ok(self.with_var(name, v))
    }
}

/// JSON text as a template value, objects keeping their key order (which
/// `tojson` writes back as it was).
pub fn parse_json(text: &str) -> Result<Value, EngineError> {
    serde_json::from_str(text).map_err(|e| EngineError::Template(format!("JSON input: {e}")))
}

/// The wall clock `strftime_now` reads.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are passed to the template as
    /// `transformers` does.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = python_environment(Arc::new(SystemTime::now));
        let compiled = without_panics(|| env.add_template_owned(NAME, rewrite::rewrite(source)))
            .map_err(|what| {
                EngineError::Template(format!(
                    "the template could not be compiled (the compiler failed: {what})"
                ))
            })?;
        compiled.map_err(|e| EngineError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The same template with `strftime_now` reading `clock` instead of the
    /// system time (for reproducible renderings).
    pub fn with_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.env
            .add_function("strftime_now", strftime_now(Arc::new(clock)));
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_with(messages, &TemplateInputs::new(add_generation_prompt))
    }

    /// Renders the conversation with tools and further template variables.
    pub fn render_with(
        &self,
        messages: &[Message],
        inputs: &TemplateInputs,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| EngineError::Template(describe(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            (
                "tools".into(),
                inputs.tools.clone().unwrap_or(Value::from(())),
            ),
            ("documents".into(), Value::from(())),
            (
                "add_generation_prompt".into(),
                Value::from(inputs.add_generation_prompt),
            ),
            ("bos_token".into(), Value::from(self.bos_token.as_str())),
            ("eos_token".into(), Value::from(self.eos_token.as_str())),
        ];
        ctx.extend(inputs.vars.iter().cloned());
        match without_panics(|| tmpl.render(Value::from_iter(ctx))) {
            Ok(rendered) => rendered.map_err(|e| EngineError::Template(describe(&e))),
            Err(what) => Err(EngineError::Template(format!(
                "the template could not be rendered (the renderer failed: {what})"
            ))),
        }
    }
}

thread_local! {
    /// Set while [`without_panics`] runs on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into an error carrying its message
/// and keeping the panic's report off stderr: the template engine can
/// panic on odd input (a reversed slice of an empty string panicked in
/// minijinja 2.24, found by fuzzing), and a template comes with a
/// downloaded file.
fn without_panics<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    out.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into())
    })
}

/// An environment set up as transformers sets up jinja2: `trim_blocks`,
/// `lstrip_blocks`, `break`/`continue`, `raise_exception`, `strftime_now`,
/// a `tojson` that keeps key order and non-ASCII text, Python's string and
/// dict methods, and values printed as Python prints them.
/// Template instructions a rendering may run: a chat template comes with a
/// downloaded model file, and one that loops for ever must fail, not hang
/// the engine. Real templates render a long conversation in thousands.
const TEMPLATE_FUEL: u64 = 20_000_000;

fn python_environment(clock: Clock) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        let written = match value.as_str() {
            Some(text) => out.write_str(text),
            None => out.write_str(&python::str(value)),
        };
        written.map_err(|e| JinjaError::new(ErrorKind::WriteFailure, e.to_string()))
    });
    env.add_filter("string", |value: Value| python::str(&value));
    env.add_filter("replace", python::replace);
    env.add_filter("tojson", tojson);
    env.add_filter(rewrite::ITERABLE_FILTER, python::iterable);
    env.add_test("iterable", |value: &Value| python::is_iterable(value));
    for (name, builtin) in [
        ("map", Value::from_function(filters::map)),
        ("select", Value::from_function(filters::select)),
        ("selectattr", Value::from_function(filters::selectattr)),
        ("reject", Value::from_function(filters::reject)),
        ("rejectattr", Value::from_function(filters::rejectattr)),
    ] {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            let items: Vec<Value> = builtin.call(state, &args)?.try_iter()?.collect();
            Ok::<_, JinjaError>(Value::from_object(python::Generator(items)))
        });
    }
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now(clock));
    env
}

fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// The template's own refusal (`raise_exception('…')`), message kept whole.
fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an error: {msg}"),
    ))
}

/// `strftime_now(fmt)`: the clock's date and time (UTC), for the common
/// directives templates use (%d %m %Y %y %b %B %a %A %H %M %S %j %%).
fn strftime_now(clock: Clock) -> impl Fn(String) -> Value + Send + Sync + 'static {
    move |fmt: String| {
        let secs = clock()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Value::from(format_time(secs, &fmt))
    }
}

/// Formats a Unix time (UTC) with a subset of strftime directives.
pub fn format_time(unix_secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = unix_secs.div_euclid(86_400);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize];
    let rem = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// transformers' `tojson`: Python's `json.dumps` with `ensure_ascii=False`
/// by default and the keys in their own order; takes `ensure_ascii`,
/// `indent`, `separators` and `sort_keys` as Python does.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let mut style = python::JsonStyle {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ..python::JsonStyle::default()
    };
    if let Some(indent) = kwargs.get::<Option<Value>>("indent")? {
        style.indent = match indent.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => indent.as_str().map(str::to_string),
        };
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(seps).map_err(|_| {
            JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            )
        })?;
        style.item_separator = Some(item);
        style.key_separator = Some(key);
    }
    kwargs.assert_all_used()?;
    Ok(Value::from_safe_string(python::json_dumps(&value, &style)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_methods_and_exceptions() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system: ' + m.content.strip()) }}{% endif %}[{{ m.role.upper() }}]{{ m.content.strip() }}{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::user("  hi  ")], false).unwrap(),
            "[USER]hi"
        );
        let err = t
            .render(&[Message::system(" x ")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system: x"), "{err}");
    }

    #[test]
    fn a_template_that_never_ends_fails_instead_of_hanging() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = t
            .render(&[Message::user("hi")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fuel"), "{err}");
        // 10^10 iterations would take hours; the fuel runs out in seconds.
        assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    }

    #[test]
    fn tojson_matches_python_spacing() {
        let t = ChatTemplate::new("{{ {'a': [1, 2], 'b': '中'} | tojson }}", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), r#"{"a": [1, 2], "b": "中"}"#);
    }

    #[test]
    fn dates_format_like_strftime() {
        // 2024-07-23 14:05:09 UTC
        assert_eq!(
            format_time(1_721_743_509, "%d %b %Y %H:%M:%S"),
            "23 Jul 2024 14:05:09"
        );
        assert_eq!(
            format_time(0, "%Y-%m-%d %j %B %A %a"),
            "1970-01-01 001 January Thursday Thu"
        );
        assert_eq!(format_time(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }

    #[test]
    fn the_clock_is_injectable() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "")
            .unwrap()
            .with_clock(|| UNIX_EPOCH + std::time::Duration::from_secs(1_722_002_709));
        assert_eq!(t.render(&[], false).unwrap(), "26 Jul 2024");
    }

    #[test]
    fn a_template_refusing_the_conversation_says_why() {
        let t = ChatTemplate::new(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[Message::system("x")], true).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("raised an error: System role not supported"),
            "{text}"
        );
    }

    #[test]
    fn tools_and_variables_reach_the_template() {
        let t = ChatTemplate::new(
            "{% if tools is not none %}{{ tools | tojson }}{% endif %}\
             {% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}\
             {% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let tools = parse_json(r#"[{"name": "f", "description": "d", "args": {}}]"#).unwrap();
        let inputs = TemplateInputs::new(true)
            .with_tools(tools)
            .enable_thinking(false);
        assert_eq!(
            t.render_with(&[Message::user("hi")], &inputs).unwrap(),
            r#"[{"name": "f", "description": "d", "args": {}}]/no_thinkhi"#
        );
        assert_eq!(t.render(&[Message::user("hi")], true).unwrap(), "hi");
    }

    #[test]
    fn looping_over_none_fails_as_in_python() {
        let t = ChatTemplate::new("{% for t in tools %}{{ t }}{% endfor %}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("'NoneType' object is not iterable"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .err()
            .unwrap();
        assert!(err.to_string().contains("chat template"), "{err}");
    }

    /// A template the renderer itself panics on (a reversed slice of an
    /// empty string, found by fuzzing) is an error, and rendering works
    /// on afterwards.
    #[test]
    fn a_renderer_panic_is_an_error() {
        let t = ChatTemplate::new("{{ 'abc'[::-1] }}{{ ''[::-1] }}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("could not be rendered"), "{err}");
        let ok = ChatTemplate::new("{{ 'abc'[::-1] }}", "", "").unwrap();
        assert_eq!(ok.render(&[], true).unwrap(), "cba");
    }
}
