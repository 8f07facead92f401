//! Chat templates: the model's own Jinja template from `tokenizer_config.json`,
//! rendered with minijinja plus Python-compatible string methods, the way
//! `transformers`' `apply_chat_template` renders it.

use minijinja::value::Value;
use minijinja::{Environment, Error as JinjaError, ErrorKind};

use lw_core::Message;

use crate::error::EngineError;

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
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| EngineError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
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
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| EngineError::Template(describe(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_serialize(
                    serde_json::json!({"role": m.role.as_str(), "content": m.content}),
                )
            })
            .collect();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| EngineError::Template(describe(&e)))
    }
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

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC date and time, for the common
/// directives templates use (%d %m %Y %y %b %B %H %M %S %j %%).
fn strftime_now(fmt: String) -> Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_time(secs, &fmt)))
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
    let days = unix_secs.div_euclid(86_400);
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

/// Python's `json.dumps` spacing (`", "` and `": "`), non-ASCII kept, as
/// transformers' `tojson` does; `indent=N` pretty-prints.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
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
        assert_eq!(format_time(0, "%Y-%m-%d %j %B"), "1970-01-01 001 January");
        assert_eq!(format_time(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .err()
            .unwrap();
        assert!(err.to_string().contains("chat template"), "{err}");
    }
}
