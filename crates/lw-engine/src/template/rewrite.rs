//! Source rewrites for the two places where jinja2, as transformers runs it,
//! and minijinja read the same tag differently:
//!
//! - `{% generation %}…{% endgeneration %}` (transformers' tag marking the
//!   assistant's text, rendered unchanged) becomes `{% if true %}…{% endif %}`;
//! - `{% for x in EXPR %}` becomes `{% for x in (EXPR)|ITERABLE %}` so that
//!   looping over `None` fails as it does in Python (minijinja loops zero
//!   times); [`ITERABLE_FILTER`] is that filter.
//!
//! Whitespace control (`{%-`, `-%}`) is kept, so the output is unchanged.
//! Only `{% … %}` tags are touched; text, `{{ … }}`, comments and raw
//! blocks are copied as they are.

/// The filter that passes an iterable through and refuses `None`.
pub const ITERABLE_FILTER: &str = "__python_iterable";

pub fn rewrite(source: &str) -> String {
    let mut out = String::with_capacity(source.len() + 64);
    let mut rest = source;
    let mut in_raw = false;
    while let Some(at) = next_delimiter(rest) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let (close, is_tag) = match &rest[..2] {
            "{#" => ("#}", false),
            "{{" => ("}}", false),
            _ => ("%}", true),
        };
        let Some(len) = delimited_len(rest, close) else {
            break; // unterminated: the parser reports it
        };
        let whole = &rest[..len];
        rest = &rest[len..];
        if !is_tag {
            out.push_str(whole);
            continue;
        }
        let tag = Tag::parse(whole);
        match tag.body.split_whitespace().next() {
            Some("endraw") => in_raw = false,
            Some("raw") => in_raw = true,
            _ => {}
        }
        match tag.rewritten() {
            Some(new) if !in_raw => out.push_str(&new),
            _ => out.push_str(whole),
        }
    }
    out.push_str(rest);
    out
}

/// The next `{{`, `{%` or `{#`.
fn next_delimiter(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    (0..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'{' && matches!(bytes[i + 1], b'{' | b'%' | b'#'))
}

/// The length of the construct opening `s` up to and including `close`,
/// skipping string literals (comments have none).
fn delimited_len(s: &str, close: &str) -> Option<usize> {
    if close == "#}" {
        return s.find(close).map(|i| i + 2);
    }
    let bytes = s.as_bytes();
    let mut i = 2;
    let mut quote = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if bytes[i..].starts_with(close.as_bytes()) => return Some(i + 2),
            None => {}
        }
        i += 1;
    }
    None
}

/// A `{% … %}` tag split into its whitespace markers and body.
struct Tag<'a> {
    lead: &'a str,
    body: &'a str,
    trail: &'a str,
}

impl<'a> Tag<'a> {
    fn parse(whole: &'a str) -> Self {
        let inner = &whole[2..whole.len() - 2];
        let (lead, inner) = match inner.strip_prefix(['-', '+']) {
            Some(rest) => (&inner[..1], rest),
            None => ("", inner),
        };
        let (body, trail) = match inner.strip_suffix(['-', '+']) {
            Some(rest) => (rest, &inner[inner.len() - 1..]),
            None => (inner, ""),
        };
        Tag { lead, body, trail }
    }

    fn rewritten(&self) -> Option<String> {
        let body = match self.body.trim() {
            "generation" => " if true ".to_string(),
            "endgeneration" => " endif ".to_string(),
            _ => self.for_loop_checked()?,
        };
        Some(format!("{{%{}{body}{}%}}", self.lead, self.trail))
    }

    /// `for TARGET in EXPR [if COND] [recursive]` with EXPR wrapped.
    fn for_loop_checked(&self) -> Option<String> {
        let body = self.body;
        let words = top_level_words(body);
        let (first_start, first_end) = *words.first()?;
        if &body[first_start..first_end] != "for" {
            return None;
        }
        let &(_, in_end) = words.iter().find(|&&(s, e)| &body[s..e] == "in")?;
        let expr_end = words
            .iter()
            .filter(|&&(s, _)| s > in_end)
            .find(|&&(s, e)| matches!(&body[s..e], "if" | "recursive"))
            .map_or(body.trim_end().len(), |&(s, _)| s);
        let expr = body[in_end..expr_end].trim();
        if expr.is_empty() {
            return None;
        }
        Some(format!(
            "{} ({expr})|{ITERABLE_FILTER} {}",
            &body[..in_end],
            body[expr_end..].trim_start()
        ))
    }
}

/// The spans of the bare words of an expression that lie outside strings
/// and brackets.
fn top_level_words(s: &str) -> Vec<(usize, usize)> {
    let bytes = s.as_bytes();
    let mut words = Vec::new();
    let (mut depth, mut quote, mut i) = (0usize, None, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' {
                i += 1;
            } else if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match b {
            b'\'' | b'"' => quote = Some(b),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b if b.is_ascii_alphanumeric() || b == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                // A word after a dot is an attribute (`x.in`), not a keyword.
                if depth == 0 && (start == 0 || bytes[start - 1] != b'.') {
                    words.push((start, i));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_text_inside_a_tag_is_walked_by_bytes() {
        // A two-byte character right after an escape inside a string, and
        // one just before the closing delimiter (found by fuzzing).
        for src in [
            "{{ 'a\\ނ' }}",
            "{{ xނ }}",
            "{% set x = \"ނ\" %}{{ x }}",
            "{{ \"\\ނ",
        ] {
            let _ = rewrite(src);
            let _ = crate::ChatTemplate::new(src, "", "").map(|t| t.render(&[], false));
        }
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        assert_eq!(
            rewrite("a{%- generation -%}b{% endgeneration %}c"),
            "a{%- if true -%}b{% endif %}c"
        );
    }

    #[test]
    fn loops_check_their_iterable() {
        assert_eq!(
            rewrite("{%- for m in messages[1:] if m.role != 'for x in y' %}"),
            "{%- for m in (messages[1:])|__python_iterable if m.role != 'for x in y' %}"
        );
        assert_eq!(
            rewrite("{% for k, v in d.items() recursive -%}"),
            "{% for k, v in (d.items())|__python_iterable recursive -%}"
        );
    }

    #[test]
    fn text_expressions_comments_and_raw_blocks_are_kept() {
        let src = "for x in y {{ '{% for a in b %}' }}{# {% for c in d %} #}\
                   {% raw %}{% for e in f %}{% endraw %}";
        assert_eq!(rewrite(src), src);
    }
}
