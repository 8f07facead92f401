//! Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness
//! scores its multiple-choice tasks: each choice is a continuation of the
//! prompt, scored by the sum of its tokens' log-probabilities; `acc` takes
//! the choice with the highest sum, `acc_norm` the highest sum per
//! character of the choice (the harness's length normalisation).
//!
//! Task files are JSON lines `{"prompt", "choices", "answer"}`: `answer`
//! is the index of the right choice or its text; an `id` is kept; with
//! `"chat": true` the prompt is a user's turn, rendered with the model's
//! chat template (the choices are the start of the assistant's answer).
//! Tokenization follows the harness: spaces ending the prompt move to the
//! start of the continuation, and a continuation's tokens are those of
//! prompt + choice after the prompt's own (so a merge across the boundary
//! is scored as the model would read the whole text).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::items::{objects, take_string, EvalError};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    pub id: String,
    pub prompt: String,
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
    /// The prompt is a user's chat turn: it is asked through the model's
    /// chat template (`"chat": true` in the task file).
    pub chat: bool,
}

/// Reads a task file (see the module comment); every problem names its
/// line.
pub fn read_mc_items(path: &Path) -> Result<Vec<McItem>, EvalError> {
    let mut items = Vec::new();
    for (line, mut m) in objects(path, false)? {
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let prompt = m
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"prompt\" string".into()))?
            .to_string();
        let choices: Vec<String> = m
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"choices\" array".into()))?
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("\"choices\" must hold strings".into()))?;
        if choices.len() < 2 {
            return Err(bad(format!(
                "{} choice(s); a question needs at least 2",
                choices.len()
            )));
        }
        if let Some(k) = choices.iter().position(String::is_empty) {
            return Err(bad(format!("choice {k} is empty")));
        }
        let answer = match m.get("answer") {
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| n as usize)
                .filter(|&n| n < choices.len())
                .ok_or_else(|| {
                    bad(format!(
                        "\"answer\" {n} is not a choice index (0..{})",
                        choices.len()
                    ))
                })?,
            Some(Value::String(s)) => choices
                .iter()
                .position(|c| c == s)
                .ok_or_else(|| bad(format!("\"answer\" {s:?} is none of the choices")))?,
            _ => return Err(bad("no \"answer\" (a choice index or text)".into())),
        };
        let chat = match m.get("chat") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("\"chat\" must be true or false".into())),
        };
        items.push(McItem {
            id: take_string(&mut m, "id").unwrap_or_else(|| line.to_string()),
            prompt,
            choices,
            answer,
            chat,
        });
    }
    if items.is_empty() {
        return Err(EvalError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(items)
}

/// The harness's split of prompt and choice: spaces ending the prompt
/// move to the start of the choice.
pub fn split_context(prompt: &str, choice: &str) -> (String, String) {
    let kept = prompt.trim_end_matches(' ');
    let moved = &prompt[kept.len()..];
    (kept.to_string(), format!("{moved}{choice}"))
}

/// Token ids of a choice after its prompt: those of prompt + choice past
/// the prompt's own `ctx` (`encode` tokenizes a text as the model reads
/// it; `ctx` is `encode(context)`, computed once per question).
pub fn continuation_tokens(
    encode: &mut dyn FnMut(&str) -> Result<Vec<u32>, String>,
    context: &str,
    ctx: &[u32],
    continuation: &str,
) -> Result<Vec<u32>, String> {
    let whole = encode(&format!("{context}{continuation}"))?;
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    if cont.is_empty() {
        return Err(format!("{continuation:?} adds no token after its prompt"));
    }
    Ok(cont)
}

/// One question's scores.
#[derive(Debug, Clone, Serialize)]
pub struct McResult {
    pub id: String,
    pub answer: usize,
    /// Per choice: the sum of its tokens' log-probabilities.
    pub logprobs: Vec<f64>,
    /// Per choice: its token ids after the prompt.
    pub tokens: Vec<Vec<u32>>,
    /// The choice `acc` takes, and the one `acc_norm` takes.
    pub pred: usize,
    pub pred_norm: usize,
}

impl McResult {
    /// Scores from the choices' log-probability sums (`item.choices` give
    /// the characters `acc_norm` divides by). Ties go to the first choice.
    pub fn new(item: &McItem, logprobs: Vec<f64>, tokens: Vec<Vec<u32>>) -> McResult {
        let argmax = |score: &dyn Fn(usize) -> f64| {
            (0..logprobs.len()).fold(0, |best, k| if score(k) > score(best) { k } else { best })
        };
        let pred = argmax(&|k| logprobs[k]);
        let pred_norm = argmax(&|k| logprobs[k] / item.choices[k].chars().count() as f64);
        McResult {
            id: item.id.clone(),
            answer: item.answer,
            logprobs,
            tokens,
            pred,
            pred_norm,
        }
    }
}

/// Accuracy over a task, with the harness's standard error
/// (`sqrt(p(1 − p) / (n − 1))`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McSummary {
    pub items: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

pub fn summarize(results: &[McResult]) -> McSummary {
    let n = results.len();
    let share = |hit: &dyn Fn(&McResult) -> bool| {
        results.iter().filter(|r| hit(r)).count() as f64 / n.max(1) as f64
    };
    let stderr = |p: f64| {
        if n > 1 {
            (p * (1.0 - p) / (n - 1) as f64).sqrt()
        } else {
            0.0
        }
    };
    let acc = share(&|r| r.pred == r.answer);
    let acc_norm = share(&|r| r.pred_norm == r.answer);
    McSummary {
        items: n,
        acc,
        acc_stderr: stderr(acc),
        acc_norm,
        acc_norm_stderr: stderr(acc_norm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompts_trailing_spaces_move_to_the_choice() {
        assert_eq!(
            split_context("Q: sky? A: ", "blue"),
            ("Q: sky? A:".into(), " blue".into())
        );
        assert_eq!(
            split_context("天空：", "蓝"),
            ("天空：".into(), "蓝".into())
        );
    }

    #[test]
    fn the_continuation_is_the_whole_texts_tokens_past_the_prompts() {
        // A "tokenizer" that merges "ab" into one token: the choice "b"
        // after "a" is scored as the whole text reads, one token, and
        // the prompt's own tokens are cut at their count.
        let mut enc = |s: &str| -> Result<Vec<u32>, String> {
            Ok(s.replace("ab", "X").chars().map(|c| c as u32).collect())
        };
        let ctx = enc("xa").unwrap();
        assert_eq!(ctx, vec!['x' as u32, 'a' as u32]);
        let cont = continuation_tokens(&mut enc, "xa", &ctx, "bc").unwrap();
        assert_eq!(cont, vec!['c' as u32]);
        assert!(continuation_tokens(&mut enc, "xa", &ctx, "b").is_err());
        // No prompt: the choice whole.
        let cont = continuation_tokens(&mut enc, "", &[], "ab").unwrap();
        assert_eq!(cont, vec!['X' as u32]);
    }

    #[test]
    fn acc_takes_the_highest_sum_and_acc_norm_the_highest_per_character() {
        let item = McItem {
            id: "1".into(),
            prompt: "p".into(),
            choices: vec!["a".into(), "longer one".into()],
            answer: 1,
            chat: false,
        };
        // −2 over 1 character against −5 over 10: acc picks 0, acc_norm 1.
        let r = McResult::new(&item, vec![-2.0, -5.0], vec![vec![1], vec![2, 3]]);
        assert_eq!((r.pred, r.pred_norm), (0, 1));
        let s = summarize(&[
            r.clone(),
            McResult::new(&item, vec![-9.0, -5.0], vec![vec![1], vec![2, 3]]),
        ]);
        assert_eq!((s.acc, s.acc_norm), (0.5, 1.0));
        assert!((s.acc_stderr - 0.5).abs() < 1e-12);
        assert_eq!(s.acc_norm_stderr, 0.0);
    }

    #[test]
    fn bad_task_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("lw-mc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let cases = [
            (
                "{\"prompt\": \"p\", \"choices\": [\"a\"], \"answer\": 0}",
                "at least 2",
            ),
            (
                "{\"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": 2}",
                "not a choice index",
            ),
            (
                "{\"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": \"c\"}",
                "none of the choices",
            ),
            (
                "{\"prompt\": \"p\", \"choices\": [\"a\", \"\"], \"answer\": 0}",
                "choice 1 is empty",
            ),
            ("{\"choices\": [\"a\", \"b\"], \"answer\": 0}", "\"prompt\""),
            (
                "{\"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": 0, \"chat\": 1}",
                "\"chat\" must be true or false",
            ),
            ("not json", "invalid JSON"),
        ];
        for (line, want) in cases {
            std::fs::write(&path, format!("\n{line}\n")).unwrap();
            let msg = read_mc_items(&path).unwrap_err().to_string();
            assert!(msg.contains("t.jsonl:2") && msg.contains(want), "{msg}");
        }
        std::fs::write(
            &path,
            "{\"id\": \"q\", \"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": \"b\"}\n",
        )
        .unwrap();
        let items = read_mc_items(&path).unwrap();
        assert_eq!((items[0].id.as_str(), items[0].answer), ("q", 1));
        assert!(!items[0].chat);
        std::fs::write(
            &path,
            "{\"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": 0, \"chat\": true}\n",
        )
        .unwrap();
        assert!(read_mc_items(&path).unwrap()[0].chat);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
