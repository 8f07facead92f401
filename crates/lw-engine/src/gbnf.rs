//! llama.cpp's GBNF grammars, read and written out in the Lark-like syntax
//! that the structured-decoding engine compiles.
//!
//! GBNF: rules `name ::= alternatives`, `root` the start; an alternative is
//! a sequence of quoted strings, character classes (`[a-z]`, `[^"\\]`),
//! `.` (any character), rule names and parenthesised groups, each followed
//! by an optional `*`, `+`, `?` or `{m}`, `{m,}`, `{m,n}`, `{,n}`; `#` starts
//! a comment. A rule runs until the next `name ::=`, so alternatives may be
//! written over several lines.
//!
//! Every GBNF name becomes a Lark rule (`root` becomes `start`); strings
//! become Lark strings and classes single-character regular expressions, so
//! repetition stays in the grammar, where GBNF has it. Except for a
//! repeated class whose run must end where the next element starts (a
//! string or class beginning with a byte no character of the run starts
//! with): the run is one lexeme, and a single next character of a class
//! disjoint from the run (`[^。！？]{3,80} [。！？]`) joins it. Both read the
//! same texts as GBNF; the mask then comes from the lexer's automaton
//! instead of a parser step per character (AgentWrite's plan grammar: about
//! five times cheaper).
//!
//! One difference from llama.cpp: a string is one lexeme, and the lexer
//! commits to it once its first characters match. Where a class run may be
//! followed by a string that starts like the run continues (`[^\n]+ " - x"`),
//! text that begins the string and then leaves it (` - y`) is refused,
//! though llama.cpp would read it as more of the run. Splitting strings into
//! one lexeme per character removes the difference, at about nine times
//! the mask time (json.gbnf on SmolLM2's vocabulary: 2.9 ms a token instead
//! of 0.33 ms).

use std::collections::HashMap;
use std::fmt::Write as _;

/// What is wrong with a GBNF text, and where (line and column, from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GbnfError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for GbnfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// A character class: its ranges (or the ranges it excludes) and its
/// regular expression.
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
    regex: String,
}

impl Class {
    fn contains(&self, c: char) -> bool {
        self.negated != self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi)
    }

    /// True when a lexeme of this class's run ends at the first byte of
    /// `c`: `c` is not in the class, and no character of the class starts
    /// with `c`'s first UTF-8 byte (the lexer decides a run's end on one
    /// byte; a negated class counts as holding every lead byte).
    fn ends_before(&self, c: char) -> bool {
        let lead = |c: char| c.to_string().as_bytes()[0];
        let b = lead(c);
        !self.contains(c)
            && (c.is_ascii()
                || !self.negated
                    && self
                        .ranges
                        .iter()
                        .all(|&(lo, hi)| b < lead(lo) || b > lead(hi)))
    }

    /// Every character, for a listed class of up to 4,096 of them.
    fn members(&self) -> Option<Vec<char>> {
        let size: u32 = self
            .ranges
            .iter()
            .map(|&(lo, hi)| hi as u32 - lo as u32 + 1)
            .sum();
        (!self.negated && size <= 4096)
            .then(|| self.ranges.iter().flat_map(|&(lo, hi)| lo..=hi).collect())
    }
}

/// How a repeated class's run relates to what follows it.
enum RunEnd {
    /// The next element may start inside the run: one lexeme a character.
    Open,
    /// The next element starts where the run's lexeme must end, or
    /// nothing follows (the run ends `root`): the run is one lexeme.
    Apart,
    /// The next element is one character of a class disjoint from the run
    /// (but sharing lead bytes with it): run and character are one lexeme,
    /// which nothing can extend.
    Joined,
}

/// The Lark grammar equivalent to a GBNF text.
pub fn to_lark(src: &str) -> Result<String, GbnfError> {
    let chars: Vec<char> = src.chars().collect();
    // A first reading learns whether any rule refers to `root`; where none
    // does, a run at the end of `root` ends the output (see `RunEnd`).
    let root_used = {
        let mut p = Parser {
            chars: chars.clone(),
            pos: 0,
            root_ends_output: false,
            in_root: false,
        };
        p.rules()
            .map(|(_, _, used)| used.iter().any(|(n, _)| n == "root"))?
    };
    let mut p = Parser {
        chars,
        pos: 0,
        root_ends_output: !root_used,
        in_root: false,
    };
    let (rules, mut names, used) = p.rules()?;
    if !rules.iter().any(|(n, _, _)| n == "root") {
        return Err(GbnfError {
            line: 1,
            column: 1,
            message: "no `root` rule (the grammar's start)".into(),
        });
    }
    for (name, at) in &used {
        if !rules.iter().any(|(n, _, _)| n == name) {
            return Err(p.error(*at, format!("rule `{name}` is used but not defined")));
        }
    }
    let mut out = String::new();
    for (name, _, body) in &rules {
        let lark = lark_name(&mut names, name);
        let _ = writeln!(out, "{lark}: {body}");
    }
    Ok(out)
}

/// The Lark rule name of a GBNF name: `start` for `root`, otherwise one
/// made of lowercase letters, digits and `_` that no other name shares.
fn lark_name(names: &mut HashMap<String, String>, name: &str) -> String {
    if name == "root" {
        return "start".into();
    }
    let n = names.len();
    names
        .entry(name.to_string())
        .or_insert_with(|| {
            let clean: String = name
                .chars()
                .map(|c| match c {
                    'a'..='z' | '0'..='9' => c,
                    'A'..='Z' => c.to_ascii_lowercase(),
                    _ => '_',
                })
                .collect();
            format!("g{n}_{clean}")
        })
        .clone()
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// No rule refers to `root`, so the end of `root` is the end of output.
    root_ends_output: bool,
    /// Reading `root`'s own alternatives (outside parentheses).
    in_root: bool,
}

impl Parser {
    /// Every rule: its name, where it starts and its Lark body; the names
    /// given so far; and the rule names used, with where.
    #[allow(clippy::type_complexity)]
    fn rules(
        &mut self,
    ) -> Result<
        (
            Vec<(String, usize, String)>,
            HashMap<String, String>,
            Vec<(String, usize)>,
        ),
        GbnfError,
    > {
        let mut rules: Vec<(String, usize, String)> = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut used: Vec<(String, usize)> = Vec::new();
        self.skip_space();
        while !self.at_end() {
            let at = self.pos;
            let name = self
                .name()
                .ok_or_else(|| self.error(at, "expected a rule name"))?;
            self.skip_space();
            if !self.eat_str("::=") {
                return Err(
                    self.error(self.pos, format!("expected `::=` after rule name `{name}`"))
                );
            }
            let mut body = String::new();
            self.in_root = name == "root";
            self.alternatives(&mut body, &mut names, &mut used, false)?;
            self.in_root = false;
            if rules.iter().any(|(n, _, _)| *n == name) {
                return Err(self.error(at, format!("rule `{name}` is defined twice")));
            }
            rules.push((name, at, body));
            self.skip_space();
        }
        Ok((rules, names, used))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn error(&self, at: usize, message: impl Into<String>) -> GbnfError {
        let before = &self.chars[..at.min(self.chars.len())];
        let line = before.iter().filter(|&&c| c == '\n').count() + 1;
        let column = before.iter().rev().take_while(|&&c| c != '\n').count() + 1;
        GbnfError {
            line,
            column,
            message: message.into(),
        }
    }

    /// Skips whitespace (newlines included) and comments.
    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.pos += 1;
                }
            } else if c.is_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n
            && s.chars()
                .eq(self.chars[self.pos..self.pos + n].iter().copied())
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.chars[start..self.pos].iter().collect())
    }

    /// Whether a rule definition (`name ::=`) starts here.
    fn at_definition(&mut self) -> bool {
        let save = self.pos;
        let found = self.name().is_some() && {
            self.skip_space();
            self.eat_str("::=")
        };
        self.pos = save;
        found
    }

    /// Alternatives up to the next definition (or `)` when `nested`).
    fn alternatives(
        &mut self,
        out: &mut String,
        names: &mut HashMap<String, String>,
        used: &mut Vec<(String, usize)>,
        nested: bool,
    ) -> Result<(), GbnfError> {
        loop {
            let mut items = 0;
            loop {
                self.skip_space();
                match self.peek() {
                    None | Some('|') | Some(')') => break,
                    _ if self.at_definition() => break,
                    _ => {}
                }
                if items > 0 {
                    out.push(' ');
                }
                self.item(out, names, used)?;
                items += 1;
            }
            if items == 0 {
                out.push_str("\"\"");
            }
            match self.peek() {
                Some('|') => {
                    self.pos += 1;
                    out.push_str(" | ");
                }
                Some(')') if nested => return Ok(()),
                Some(')') => return Err(self.error(self.pos, "`)` without `(`")),
                _ if nested => return Err(self.error(self.pos, "`(` without `)`")),
                _ => return Ok(()),
            }
        }
    }

    /// One element with its repetition.
    fn item(
        &mut self,
        out: &mut String,
        names: &mut HashMap<String, String>,
        used: &mut Vec<(String, usize)>,
    ) -> Result<(), GbnfError> {
        let at = self.pos;
        match self.peek() {
            Some('"') => {
                self.pos += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error(at, "string without its closing `\"`")),
                        Some('"') => break,
                        Some('\n') => {
                            return Err(self.error(at, "string runs past the end of its line"))
                        }
                        _ => text.push(self.char_escaped()?),
                    }
                }
                self.pos += 1;
                out.push_str(&lark_string(&text));
            }
            Some('[') => {
                let class = self.class()?;
                out.push('/');
                out.push_str(&class.regex);
                match self.run_end(&class) {
                    RunEnd::Open => out.push('/'),
                    RunEnd::Apart => {
                        // A repeated class before a string or class that
                        // cannot start inside it: one lexeme for the whole
                        // run, which ends exactly where GBNF's run must, and
                        // costs the lexer's automaton instead of a parser
                        // step per character.
                        self.repetition(out)?;
                        out.push('/');
                        return Ok(());
                    }
                    RunEnd::Joined => {
                        self.repetition(out)?;
                        self.skip_space();
                        let next = self.class()?;
                        out.push_str(&next.regex);
                        out.push('/');
                        return Ok(());
                    }
                }
            }
            Some('.') => {
                self.pos += 1;
                out.push_str("/(?s:.)/");
            }
            Some('(') => {
                self.pos += 1;
                out.push('(');
                // What follows a group's last element is not the end.
                let in_root = std::mem::replace(&mut self.in_root, false);
                self.alternatives(out, names, used, true)?;
                self.in_root = in_root;
                self.pos += 1;
                out.push(')');
            }
            Some('<') => {
                return Err(self.error(at, "token references (`<...>`) are not supported"));
            }
            _ => {
                let name = self.name().ok_or_else(|| {
                    self.error(at, format!("unexpected {:?}", self.peek().unwrap_or(' ')))
                })?;
                used.push((name.clone(), at));
                out.push_str(&lark_name(names, &name));
            }
        }
        self.repetition(out)
    }

    /// A character class at `[`: its members and its regular expression.
    fn class(&mut self) -> Result<Class, GbnfError> {
        let at = self.pos;
        self.pos += 1;
        let mut regex = String::from("[");
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
            regex.push('^');
        }
        let mut ranges: Vec<(char, char)> = Vec::new();
        loop {
            match self.peek() {
                None | Some('\n') => {
                    return Err(self.error(at, "character class without its closing `]`"))
                }
                Some(']') => break,
                _ => {}
            }
            let lo = self.char_escaped()?;
            push_class_char(&mut regex, lo);
            let mut hi = lo;
            if self.peek() == Some('-') && self.chars.get(self.pos + 1) != Some(&']') {
                self.pos += 1;
                hi = self.char_escaped()?;
                if hi < lo {
                    return Err(self.error(at, format!("range {lo:?}-{hi:?} runs backwards")));
                }
                regex.push('-');
                push_class_char(&mut regex, hi);
            }
            ranges.push((lo, hi));
        }
        self.pos += 1;
        if ranges.is_empty() {
            return Err(self.error(at, "empty character class"));
        }
        regex.push(']');
        Ok(Class {
            negated,
            ranges,
            regex,
        })
    }

    /// Whether a `+`, `*` or `{...}` repetition of `class` follows here,
    /// and how its run ends against the next element of the sequence.
    fn run_end(&mut self, class: &Class) -> RunEnd {
        let save = self.pos;
        let mut scratch = String::new();
        let repeated =
            matches!(self.peek(), Some('*' | '+' | '{')) && self.repetition(&mut scratch).is_ok();
        self.skip_space();
        let end = if !repeated {
            RunEnd::Open
        } else {
            match self.peek() {
                // The run ends `root` (no rule refers to it): nothing comes
                // after it, so one lexeme reads the same texts.
                None | Some('|') if self.in_root && self.root_ends_output => RunEnd::Apart,
                Some(_) if self.in_root && self.root_ends_output && self.at_definition() => {
                    RunEnd::Apart
                }
                Some('"') => {
                    self.pos += 1;
                    match self.peek() {
                        Some('"') | None => RunEnd::Open,
                        _ => match self.char_escaped() {
                            Ok(c) if class.ends_before(c) => RunEnd::Apart,
                            _ => RunEnd::Open,
                        },
                    }
                }
                Some('[') => match self.class() {
                    Ok(next) => match next.members() {
                        Some(m) if m.iter().all(|&c| class.ends_before(c)) => RunEnd::Apart,
                        Some(m)
                            if m.iter().all(|&c| !class.contains(c))
                                && !matches!(self.peek(), Some('*' | '+' | '?' | '{')) =>
                        {
                            RunEnd::Joined
                        }
                        _ => RunEnd::Open,
                    },
                    Err(_) => RunEnd::Open,
                },
                _ => RunEnd::Open,
            }
        };
        self.pos = save;
        end
    }

    /// `*`, `+`, `?` or a `{...}` count after an element.
    fn repetition(&mut self, out: &mut String) -> Result<(), GbnfError> {
        match self.peek() {
            Some(c @ ('*' | '+' | '?')) => {
                self.pos += 1;
                out.push(c);
            }
            Some('{') => {
                let at = self.pos;
                self.pos += 1;
                let number = |p: &mut Parser| -> Option<u32> {
                    let start = p.pos;
                    while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                        p.pos += 1;
                    }
                    p.chars[start..p.pos]
                        .iter()
                        .collect::<String>()
                        .parse()
                        .ok()
                };
                self.skip_space();
                let lo = number(self);
                self.skip_space();
                let (lo, hi) = if self.eat_str(",") {
                    self.skip_space();
                    let hi = number(self);
                    self.skip_space();
                    (lo.unwrap_or(0), hi)
                } else {
                    let n = lo.ok_or_else(|| self.error(at, "`{` needs a count"))?;
                    (n, Some(n))
                };
                if !self.eat_str("}") {
                    return Err(self.error(at, "repetition without its closing `}`"));
                }
                if hi.is_some_and(|h| h < lo) {
                    return Err(self.error(at, "repetition's upper bound is below its lower bound"));
                }
                match hi {
                    Some(h) => {
                        let _ = write!(out, "{{{lo},{h}}}");
                    }
                    None => {
                        let _ = write!(out, "{{{lo},}}");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One character of a string or class, escapes resolved.
    fn char_escaped(&mut self) -> Result<char, GbnfError> {
        let at = self.pos;
        let c = self
            .peek()
            .ok_or_else(|| self.error(at, "unexpected end"))?;
        self.pos += 1;
        if c != '\\' {
            return Ok(c);
        }
        let e = self
            .peek()
            .ok_or_else(|| self.error(at, "`\\` at the end"))?;
        self.pos += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<char, GbnfError> {
            let digits: String = p
                .chars
                .get(p.pos..p.pos + n)
                .unwrap_or(&[])
                .iter()
                .collect();
            let code = u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| p.error(at, format!("bad escape `\\{e}{digits}`")))?;
            p.pos += n;
            Ok(code)
        };
        Ok(match e {
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' => e,
            _ => return Err(self.error(at, format!("unknown escape `\\{e}`"))),
        })
    }
}

/// A Lark string (JSON syntax) for `text`.
fn lark_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A character inside a regular-expression class: letters and digits as
/// they are, every other one as a code point escape.
fn push_class_char(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        let _ = write!(out, "\\x{{{:x}}}", c as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_ends_the_output_is_one_lexeme() {
        // The run ends root's alternatives: nothing can follow it.
        assert_eq!(
            to_lark("root ::= \"a\" [^#]* | [0-9]+ # digits\n").unwrap(),
            "start: \"a\" /[^\\x{23}]*/ | /[0-9]+/\n"
        );
        // In a group, or in a root another rule refers to, something may.
        assert_eq!(
            to_lark("root ::= ([a-z]+) \"!\"").unwrap(),
            "start: (/[a-z]/+) \"!\"\n"
        );
        assert_eq!(
            to_lark("root ::= [a-z]+ | x\nx ::= \"(\" root \")\"").unwrap(),
            "start: /[a-z]/+ | g0_x\ng0_x: \"(\" start \")\"\n"
        );
    }

    #[test]
    fn rules_strings_classes_and_repetition_become_lark() {
        let src = "# a list\nroot ::= item (\", \" item){0,3} \"\\n\"\nitem ::= [a-zA-Z_]+ | \"x\\\"y\" | digit?\ndigit ::= [^0-9] .\n";
        let lark = to_lark(src).unwrap();
        assert_eq!(
            to_lark("root ::= [^-]{2,9} \"-x\" [a-z]+ \"b\"").unwrap(),
            // The first run ends before a string it cannot start: one
            // lexeme; the second could run into "b": one per character.
            "start: /[^\\x{2d}]{2,9}/ \"-x\" /[a-z]/+ \"b\"\n"
        );
        assert_eq!(
            to_lark("root ::= [^.!?]{3,9} [.!?] [a-z]+ [a-c] \" \"").unwrap(),
            // A run before a class none of whose characters it takes: one
            // lexeme; a run before a class it overlaps: one per character.
            "start: /[^\\x{2e}\\x{21}\\x{3f}]{3,9}/ /[\\x{2e}\\x{21}\\x{3f}]/ /[a-z]/+ /[a-c]/ \" \"\n"
        );
        assert_eq!(
            to_lark("root ::= [^。！]{3,9} [。！] \" \" [^\\n]+ \"。\" [a-z]+ \"。\"").unwrap(),
            // The run holds characters that start with the stop's first
            // byte (、 and 。 both start with E3): the run and its one stop
            // character are one lexeme; before a string starting with such
            // a character the run stays a character a lexeme, unless the
            // run cannot hold that byte ([a-z]).
            "start: /[^\\x{3002}\\x{ff01}]{3,9}[\\x{3002}\\x{ff01}]/ \" \" /[^\\x{a}]/+ \"。\" /[a-z]+/ \"。\"\n"
        );
        assert_eq!(
            lark,
            "start: g0_item (\", \" g0_item){0,3} \"\\u000a\"\n\
             g0_item: /[a-zA-Z\\x{5f}]/+ | \"x\\\"y\" | g1_digit?\n\
             g1_digit: /[^0-9]/ /(?s:.)/\n"
        );
    }

    #[test]
    fn alternatives_may_span_lines() {
        let src = "root ::=\n  \"a\"\n  | \"b\" # comment\n  | other\nother ::= \"c\"";
        assert_eq!(
            to_lark(src).unwrap(),
            "start: \"a\" | \"b\" | g0_other\ng0_other: \"c\"\n"
        );
    }

    #[test]
    fn errors_name_the_place() {
        let e = to_lark("root ::= \"a\" missing\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 14));
        assert!(
            e.message.contains("`missing` is used but not defined"),
            "{e}"
        );
        let e = to_lark("item ::= \"a\"").unwrap_err();
        assert!(e.message.contains("no `root`"), "{e}");
        let e = to_lark("root ::= \"a\nb\"").unwrap_err();
        assert!(e.message.contains("past the end of its line"), "{e}");
        let e = to_lark("root ::= [z-a]").unwrap_err();
        assert!(e.message.contains("backwards"), "{e}");
        let e = to_lark("root ::= (\"a\"").unwrap_err();
        assert!(e.message.contains("without `)`"), "{e}");
        let e = to_lark("root ::= \"\\q\"").unwrap_err();
        assert!(e.message.contains("unknown escape"), "{e}");
        let e = to_lark("root ::= \"a\"{3,1}").unwrap_err();
        assert!(e.message.contains("upper bound"), "{e}");
    }
}
