//! How Python shows a template's values: `str()` for `{{ … }}` and `|string`,
//! `repr()` for the items of a printed list or dict, and `json.dumps` for
//! transformers' `tojson`. Chat templates are written against Python's jinja2,
//! so `{{ none }}` must print `None` and a dict must keep its key order.
//!
//! Pure functions of a [`Value`]; the environment setup lives in the parent.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// What jinja2's `map`, `select`, `selectattr`, `reject` and `rejectattr`
/// return: a generator, which loops and joins like a list but has no length,
/// is always true, and is no JSON.
#[derive(Debug)]
pub struct Generator(pub Vec<Value>);

impl Object for Generator {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.clone())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        None
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true
    }
}

/// Python's `iter(value)` succeeds: everything minijinja iterates but `None`.
pub fn is_iterable(value: &Value) -> bool {
    !value.is_none() && value.try_iter().is_ok()
}

/// `value` if Python can loop over it; `None` is a TypeError.
pub fn iterable(value: Value) -> Result<Value, Error> {
    if value.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "'NoneType' object is not iterable",
        ));
    }
    Ok(value)
}

/// Python's `str(value)`.
pub fn str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => repr(value),
    }
}

/// Python's `repr(value)`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number(value)),
        ValueKind::String => string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(&key, out);
                out.push_str(": ");
                write_repr(&value.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// A number as Python prints it: integers in full, floats in the shortest
/// form that reads back (`1.0`, `0.1`, `1e-05`, `1e+16`).
fn number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => float_repr(f),
        Err(_) => value.to_string(),
    }
}

fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = f.to_string();
        if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's repr of a string: single quotes unless the text has a single
/// quote and no double one.
fn string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// jinja2's `replace` filter: `str.replace`, with an optional count.
pub fn replace(value: Value, old: &str, new: &str, count: Option<i64>) -> String {
    let text = str(&value);
    match count {
        Some(n) if n >= 0 => text.replacen(old, new, n as usize),
        _ => text.replace(old, new),
    }
}

/// The options of Python's `json.dumps` that templates pass to `tojson`.
#[derive(Debug, Clone, Default)]
pub struct JsonStyle {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_separator: Option<String>,
    pub key_separator: Option<String>,
    pub sort_keys: bool,
}

/// `json.dumps(value, …)`: keys in the order the map holds them (unless
/// `sort_keys`), `", "`/`": "` separators (`","` between items when
/// indenting). Undefined values and generators are errors, as in Python.
pub fn json_dumps(value: &Value, style: &JsonStyle) -> Result<String, Error> {
    let mut out = String::new();
    let item_sep = match (&style.item_separator, &style.indent) {
        (Some(sep), _) => sep.as_str(),
        (None, Some(_)) => ",",
        (None, None) => ", ",
    };
    let key_sep = style.key_separator.as_deref().unwrap_or(": ");
    let mut writer = JsonWriter {
        style,
        item_sep,
        key_sep,
        out: &mut out,
    };
    writer.value(value, 0)?;
    Ok(out)
}

struct JsonWriter<'a> {
    style: &'a JsonStyle,
    item_sep: &'a str,
    key_sep: &'a str,
    out: &'a mut String,
}

impl JsonWriter<'_> {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(value),
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable
                if value.downcast_object_ref::<Generator>().is_none() =>
            {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.open_close('[', ']', items.len(), depth, |w, i| {
                    w.value(&items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<(String, Value)> = value
                    .try_iter()?
                    .map(|k| Ok((key_text(&k)?, k)))
                    .collect::<Result<_, Error>>()?;
                if self.style.sort_keys {
                    keys.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.open_close('{', '}', keys.len(), depth, |w, i| {
                    w.string(&keys[i].0);
                    w.out.push_str(w.key_sep);
                    w.value(&value.get_item(&keys[i].1)?, depth + 1)
                })?;
            }
            kind => {
                let name = match kind {
                    ValueKind::Undefined => "Undefined",
                    ValueKind::Iterable => "generator",
                    _ => "object",
                };
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: Object of type {name} is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    /// `open`, the items (one per line when indenting), `close`; empty
    /// containers stay `[]`/`{}`.
    fn open_close(
        &mut self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                self.out.push_str(self.item_sep);
            }
            self.newline(depth + 1);
            item(self, i)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.style.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    fn number(&mut self, value: &Value) {
        let text = number(value);
        // json.dumps spells the non-finite floats as JavaScript does.
        self.out.push_str(match text.as_str() {
            "nan" => "NaN",
            "inf" => "Infinity",
            "-inf" => "-Infinity",
            other => other,
        });
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.style.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers,
/// booleans and None in their JSON spelling.
fn key_text(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number => number(key),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {key}"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_as_python_prints_them() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, 2.5, null, true], "b": "it's"}));
        assert_eq!(str(&v), r#"{'a': [1, 2.5, None, True], 'b': "it's"}"#);
        assert_eq!(str(&Value::from(false)), "False");
        assert_eq!(str(&Value::from("x")), "x");
        assert_eq!(float_repr(1.0), "1.0");
        assert_eq!(float_repr(1e-5), "1e-05");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(123.25), "123.25");
    }

    #[test]
    fn json_matches_python_json_dumps() {
        // Keys in insertion order, as Python's dicts keep them.
        let v = Value::from_serialize(serde_json::json!({"k": ["é", 1.0, {}], "e": []}));
        let plain = json_dumps(&v, &JsonStyle::default()).unwrap();
        assert_eq!(plain, r#"{"k": ["é", 1.0, {}], "e": []}"#);
        let style = JsonStyle {
            ensure_ascii: true,
            indent: Some("  ".into()),
            ..JsonStyle::default()
        };
        assert_eq!(
            json_dumps(&v, &style).unwrap(),
            "{\n  \"k\": [\n    \"\\u00e9\",\n    1.0,\n    {}\n  ],\n  \"e\": []\n}"
        );
        let astral = json_dumps(&Value::from("😀"), &style).unwrap();
        assert_eq!(astral, r#""\ud83d\ude00""#);
    }
}
