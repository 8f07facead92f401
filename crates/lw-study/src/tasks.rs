//! Multiple-choice tasks at toy scale for the checkpoint fine-tuning study,
//! made from a plain-text corpus in English and Chinese: each task is
//! answered by log-likelihood (`eval mc`), and one of them is asked in the
//! chat format that fine-tuning teaches.
//!
//! - `langid`: which language a sentence is in.
//! - `cloze`: the word (English) or character (Chinese) that comes next in
//!   a sentence, against three taken from other sentences.
//! - `order`: whether the second of two sentences is the one that follows
//!   the first in the text (half are, half are drawn from elsewhere).
//! - `paraphrase`: the original sentence against the same sentence with two
//!   of its words (characters) swapped, a meaning-changing edit.
//! - `instruct`: asked as a chat turn, the last word (character) of a
//!   sentence, against three others from it.
//!
//! Sentences go to the training or the test split by a hash of their text,
//! so no test question is built on a sentence that training questions use.

use std::collections::HashSet;

use lw_core::rng::Rng;
use serde_json::{json, Value};

/// The tasks, in the order they are made and reported.
pub const TASKS: [&str; 5] = ["langid", "cloze", "order", "paraphrase", "instruct"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

/// A sentence of the corpus and where it stands: `doc` and `index` tell
/// which sentence follows which.
#[derive(Debug, Clone)]
pub struct Sentence {
    pub text: String,
    pub lang: Lang,
    pub doc: usize,
    pub index: usize,
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}

/// Splits documents into sentences of a usable size (6–30 English words,
/// 8–60 Chinese characters), each tagged with its language; lines of
/// neither (headings, verse numbers, mixed text) are dropped.
pub fn sentences(docs: &[String]) -> Vec<Sentence> {
    let mut out = Vec::new();
    for (doc, text) in docs.iter().enumerate() {
        let mut cur = String::new();
        let mut index = 0;
        let mut flush = |cur: &mut String, out: &mut Vec<Sentence>| {
            let s = cur.split_whitespace().collect::<Vec<_>>().join(" ");
            cur.clear();
            let cjk = s.chars().filter(|&c| is_cjk(c)).count();
            let ascii_alpha = s.chars().filter(char::is_ascii_alphabetic).count();
            let lang = if (8..=60).contains(&cjk) && cjk * 10 >= s.chars().count() * 7 {
                Lang::Zh
            } else if cjk == 0
                && (6..=30).contains(&s.split(' ').count())
                && ascii_alpha * 10 >= s.len() * 6
            {
                Lang::En
            } else {
                index += 1;
                return;
            };
            out.push(Sentence {
                text: s,
                lang,
                doc,
                index,
            });
            index += 1;
        };
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            cur.push(c);
            let end = match c {
                '。' | '！' | '？' => true,
                '.' | '!' | '?' => chars.peek().is_none_or(|n| n.is_whitespace()),
                '\n' => chars.peek() == Some(&'\n'),
                _ => false,
            };
            if end {
                flush(&mut cur, &mut out);
            }
        }
        flush(&mut cur, &mut out);
    }
    out
}

/// True for sentences that belong to the test split.
pub fn in_test(s: &str) -> bool {
    // FNV-1a: stable across versions and platforms.
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    h % 5 == 0
}

/// The units a task cuts a sentence into: words (without their
/// punctuation) in English, CJK characters in Chinese.
fn units(s: &Sentence) -> Vec<String> {
    match s.lang {
        Lang::En => s
            .text
            .split(' ')
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
            .filter(|w| w.len() >= 2 && w.chars().all(char::is_alphabetic))
            .collect(),
        Lang::Zh => s
            .text
            .chars()
            .filter(|&c| is_cjk(c))
            .map(String::from)
            .collect(),
    }
}

/// A question: the prompt, the choices (the right one at `answer`), and
/// whether the prompt is a chat turn.
fn question(rng: &mut Rng, prompt: String, right: String, wrong: Vec<String>, chat: bool) -> Value {
    let mut choices = wrong;
    let answer = rng.below(choices.len() + 1);
    choices.insert(answer, right);
    let mut q = json!({"prompt": prompt, "choices": choices, "answer": answer});
    if chat {
        q["chat"] = json!(true);
    }
    q
}

/// `k` distinct units unlike `right` drawn from `pool`, or `None` when the
/// pool is too small.
fn distractors(rng: &mut Rng, pool: &[String], right: &str, k: usize) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for _ in 0..k * 50 {
        if out.len() == k {
            break;
        }
        let w = &pool[rng.below(pool.len())];
        if w != right && !out.contains(w) {
            out.push(w.clone());
        }
    }
    (out.len() == k).then_some(out)
}

fn lead(lang: Lang) -> &'static str {
    match lang {
        Lang::En => " ",
        Lang::Zh => "",
    }
}

/// One question of `task` on sentence `i` of `split` (all in one split), or
/// `None` where this sentence cannot carry one.
fn make(task: &str, rng: &mut Rng, split: &[Sentence], i: usize, pools: &Pools) -> Option<Value> {
    let s = &split[i];
    let u = units(s);
    let sp = lead(s.lang);
    match task {
        "langid" => {
            let (right, wrong) = match s.lang {
                Lang::En => (" English", " Chinese"),
                Lang::Zh => (" Chinese", " English"),
            };
            Some(question(
                rng,
                format!("{}\nLanguage:", s.text),
                right.into(),
                vec![wrong.into()],
                false,
            ))
        }
        "cloze" => {
            // The next unit after a prefix of at least three units.
            if u.len() < 5 {
                return None;
            }
            let k = 3 + rng.below(u.len() - 3);
            let right = &u[k];
            let at = match s.lang {
                Lang::En => nth_word_start(&s.text, right, k)?,
                Lang::Zh => s.text.char_indices().filter(|&(_, c)| is_cjk(c)).nth(k)?.0,
            };
            let prompt = s.text[..at].trim_end().to_string();
            let pool = pools.of(s.lang);
            let wrong = distractors(rng, pool, right, 3)?;
            Some(question(
                rng,
                prompt,
                format!("{sp}{right}"),
                wrong.into_iter().map(|w| format!("{sp}{w}")).collect(),
                false,
            ))
        }
        "order" => {
            let next = split
                .get(i + 1)
                .filter(|n| n.doc == s.doc && n.index == s.index + 1 && n.lang == s.lang)?;
            let follows = rng.below(2) == 0;
            let second = if follows {
                next
            } else {
                let other = &split[rng.below(split.len())];
                let adjacent =
                    other.doc == s.doc && (other.index == s.index || other.index == s.index + 1);
                if other.lang != s.lang || adjacent || other.text == next.text {
                    return None;
                }
                other
            };
            let (prompt, yes, no) = match s.lang {
                Lang::En => (
                    format!(
                        "{}\n{}\nDoes the second sentence follow the first? Answer:",
                        s.text, second.text
                    ),
                    " yes",
                    " no",
                ),
                Lang::Zh => (
                    format!("{}\n{}\n第二句是否紧接着第一句？答：", s.text, second.text),
                    "是",
                    "否",
                ),
            };
            let (right, wrong) = if follows { (yes, no) } else { (no, yes) };
            Some(question(
                rng,
                prompt,
                right.into(),
                vec![wrong.into()],
                false,
            ))
        }
        "paraphrase" => {
            // Two units of different text swapped in place.
            if u.len() < 4 {
                return None;
            }
            let (a, b) = (rng.below(u.len()), rng.below(u.len()));
            if u[a] == u[b] {
                return None;
            }
            let edited = swap_units(s, &u[a], &u[b])?;
            Some(question(
                rng,
                String::new(),
                s.text.clone(),
                vec![edited],
                false,
            ))
        }
        "instruct" => {
            let right = u.last()?;
            let last_word = s.text.split(' ').next_back()?;
            if s.lang == Lang::En && last_word.trim_matches(|c: char| !c.is_alphanumeric()) != right
            {
                return None;
            }
            let mut others: Vec<String> = u[..u.len() - 1]
                .iter()
                .filter(|w| *w != right)
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            others.sort();
            if others.len() < 3 {
                return None;
            }
            let wrong = distractors(rng, &others, right, 3)?;
            let prompt = match s.lang {
                Lang::En => format!("What is the last word of this sentence?\n{}", s.text),
                Lang::Zh => format!("这句话的最后一个字是什么？\n{}", s.text),
            };
            Some(question(rng, prompt, right.clone(), wrong, true))
        }
        _ => None,
    }
}

/// Byte offset of the `k`-th unit of an English sentence (the word `w`).
fn nth_word_start(text: &str, w: &str, k: usize) -> Option<usize> {
    let mut seen = 0;
    let mut pos = 0;
    for word in text.split(' ') {
        let core = word.trim_matches(|c: char| !c.is_alphanumeric());
        if core.len() >= 2 && core.chars().all(char::is_alphabetic) {
            if seen == k {
                return (core == w && word.starts_with(core)).then_some(pos);
            }
            seen += 1;
        }
        pos += word.len() + 1;
    }
    None
}

/// The sentence with the first occurrences of units `a` and `b` swapped.
fn swap_units(s: &Sentence, a: &str, b: &str) -> Option<String> {
    match s.lang {
        Lang::En => {
            let mut words: Vec<String> = s.text.split(' ').map(String::from).collect();
            let find = |w: &str, words: &[String]| {
                words
                    .iter()
                    .position(|x| x.trim_matches(|c: char| !c.is_alphanumeric()) == w)
            };
            let (i, j) = (find(a, &words)?, find(b, &words)?);
            let (wi, wj) = (words[i].clone(), words[j].clone());
            words[i] = wi.replacen(a, b, 1);
            words[j] = wj.replacen(b, a, 1);
            Some(words.join(" "))
        }
        Lang::Zh => {
            let mut chars: Vec<char> = s.text.chars().collect();
            let (ca, cb) = (a.chars().next()?, b.chars().next()?);
            let i = chars.iter().position(|&c| c == ca)?;
            let j = chars.iter().position(|&c| c == cb)?;
            chars.swap(i, j);
            Some(chars.into_iter().collect())
        }
    }
}

/// Every unit of a split per language: the cloze's distractors.
struct Pools {
    en: Vec<String>,
    zh: Vec<String>,
}

impl Pools {
    fn new(split: &[Sentence]) -> Self {
        let mut en = HashSet::new();
        let mut zh = HashSet::new();
        for s in split {
            let set = if s.lang == Lang::En { &mut en } else { &mut zh };
            set.extend(
                units(s)
                    .into_iter()
                    .filter(|w| s.lang == Lang::Zh || w.len() >= 3),
            );
        }
        let sorted = |s: HashSet<String>| {
            let mut v: Vec<String> = s.into_iter().collect();
            v.sort();
            v
        };
        Pools {
            en: sorted(en),
            zh: sorted(zh),
        }
    }

    fn of(&self, lang: Lang) -> &[String] {
        match lang {
            Lang::En => &self.en,
            Lang::Zh => &self.zh,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the corpus has too few usable {lang} sentences for the {split} split (found {found}; each split needs at least 20)")]
    TooFew {
        lang: &'static str,
        split: &'static str,
        found: usize,
    },
    #[error("task {task}: could make only {made} of {wanted} {split} questions from this corpus")]
    Short {
        task: String,
        split: &'static str,
        made: usize,
        wanted: usize,
    },
}

/// A task's questions, as `eval mc` reads them.
#[derive(Debug, Clone)]
pub struct McTask {
    pub name: String,
    pub train: Vec<Value>,
    pub test: Vec<Value>,
}

/// The questions of every task, half English and
/// half Chinese in each split, sentences drawn at random (with `seed`).
pub fn make_tasks(
    sentences: &[Sentence],
    train: usize,
    test: usize,
    seed: u64,
) -> Result<Vec<McTask>, TaskError> {
    let (test_s, train_s): (Vec<Sentence>, Vec<Sentence>) =
        sentences.iter().cloned().partition(|s| in_test(&s.text));
    for (split, name) in [(&train_s, "training"), (&test_s, "test")] {
        for (lang, label) in [(Lang::En, "English"), (Lang::Zh, "Chinese")] {
            let n = split.iter().filter(|s| s.lang == lang).count();
            if n < 20 {
                return Err(TaskError::TooFew {
                    lang: label,
                    split: name,
                    found: n,
                });
            }
        }
    }
    let mut out = Vec::new();
    for (t, task) in TASKS.iter().enumerate() {
        let mut splits = Vec::new();
        for (s, (split, wanted, name)) in [(&train_s, train, "training"), (&test_s, test, "test")]
            .into_iter()
            .enumerate()
        {
            let mut rng = Rng::new(seed ^ ((t as u64) << 32) ^ ((s as u64) << 48));
            let pools = Pools::new(split);
            let by_lang: Vec<Vec<usize>> = [Lang::En, Lang::Zh]
                .iter()
                .map(|&l| (0..split.len()).filter(|&i| split[i].lang == l).collect())
                .collect();
            let mut qs = Vec::with_capacity(wanted);
            let mut seen = HashSet::new();
            let mut tries = 0;
            while qs.len() < wanted && tries < wanted * 200 + 1000 {
                tries += 1;
                let idx = &by_lang[qs.len() % 2];
                let i = idx[rng.below(idx.len())];
                if let Some(mut q) = make(task, &mut rng, split, i, &pools) {
                    if seen.insert(q.to_string()) {
                        q["id"] = json!(format!("{task}-{name}-{}", qs.len() + 1));
                        qs.push(q);
                    }
                }
            }
            if qs.len() < wanted {
                return Err(TaskError::Short {
                    task: task.to_string(),
                    split: name,
                    made: qs.len(),
                    wanted,
                });
            }
            splits.push(qs);
        }
        let test_qs = splits.pop().unwrap_or_default();
        let train_qs = splits.pop().unwrap_or_default();
        out.push(McTask {
            name: task.to_string(),
            train: train_qs,
            test: test_qs,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut en = String::new();
        let mut zh = String::new();
        let words = [
            "river", "stone", "garden", "winter", "candle", "letter", "market", "window", "silver",
            "harbor", "lantern", "meadow", "orchard", "bridge", "valley", "thunder",
        ];
        let hanzi: Vec<char> = "山水风月花鸟云雨江湖春秋日夜星海林石草木门窗书画茶酒"
            .chars()
            .collect();
        for i in 0..400usize {
            let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
            en.push_str(&format!(
                "The {} by the {} saw {i} birds near the old {} at the {}. ",
                w(0),
                w(1),
                w(2),
                w(3)
            ));
            let digits = "零一二三四五六七八九";
            let n: String = format!("{i:03}")
                .bytes()
                .map(|d| digits.chars().nth((d - b'0') as usize).unwrap())
                .collect();
            let s: String = (0..8)
                .map(|k| hanzi[(i * 5 + k * 7) % hanzi.len()])
                .collect();
            zh.push_str(&format!("{s}，{n}{}。", &s[..9]));
        }
        vec![en, zh]
    }

    #[test]
    fn sentences_are_split_and_tagged_by_language() {
        let s = sentences(&[
            "It was a bright cold day in April, and the clocks struck. Short one. \
             床前明月光，疑是地上霜。举头望明月，低头思故乡。"
                .into(),
        ]);
        let texts: Vec<(&str, Lang)> = s.iter().map(|s| (s.text.as_str(), s.lang)).collect();
        assert_eq!(
            texts,
            [
                (
                    "It was a bright cold day in April, and the clocks struck.",
                    Lang::En
                ),
                ("床前明月光，疑是地上霜。", Lang::Zh),
                ("举头望明月，低头思故乡。", Lang::Zh),
            ]
        );
        // "Short one." is dropped but still counts in the order.
        assert_eq!(s[1].index, 2);
        assert_eq!(s[2].index, 3);
    }

    #[test]
    fn every_task_has_its_right_answer_where_it_says() {
        let all = sentences(&corpus());
        let tasks = make_tasks(&all, 60, 20, 7).unwrap();
        assert_eq!(
            tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            TASKS
        );
        let by_text: std::collections::HashMap<&str, &Sentence> =
            all.iter().map(|s| (s.text.as_str(), s)).collect();
        for McTask {
            name: task,
            train,
            test,
        } in &tasks
        {
            assert_eq!((train.len(), test.len()), (60, 20), "{task}");
            for q in train.iter().chain(test) {
                let choices: Vec<&str> = q["choices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap())
                    .collect();
                let right = choices[q["answer"].as_u64().unwrap() as usize];
                let prompt = q["prompt"].as_str().unwrap();
                let distinct: HashSet<&&str> = choices.iter().collect();
                assert_eq!(distinct.len(), choices.len(), "{q}");
                match task.as_str() {
                    "langid" => {
                        let sentence = prompt.strip_suffix("\nLanguage:").unwrap();
                        let zh = by_text[sentence].lang == Lang::Zh;
                        assert_eq!(right, if zh { " Chinese" } else { " English" });
                    }
                    "cloze" => {
                        // Prompt + right choice starts a corpus sentence.
                        let whole = format!("{prompt}{right}");
                        assert!(all.iter().any(|s| s.text.starts_with(&whole)), "{q}");
                        assert_eq!(choices.len(), 4);
                    }
                    "order" => {
                        let mut lines = prompt.lines();
                        let (a, b) = (
                            by_text[lines.next().unwrap()],
                            by_text[lines.next().unwrap()],
                        );
                        let follows = a.doc == b.doc && b.index == a.index + 1;
                        assert_eq!(
                            right,
                            match (follows, a.lang) {
                                (true, Lang::En) => " yes",
                                (false, Lang::En) => " no",
                                (true, Lang::Zh) => "是",
                                (false, Lang::Zh) => "否",
                            }
                        );
                    }
                    "paraphrase" => {
                        assert!(by_text.contains_key(right), "{q}");
                        let wrong = choices.iter().find(|c| **c != right).unwrap();
                        let mut a: Vec<char> = right.chars().collect();
                        let mut b: Vec<char> = wrong.chars().collect();
                        a.sort();
                        b.sort();
                        assert_eq!(a, b, "an edit only moves text: {q}");
                    }
                    "instruct" => {
                        assert_eq!(q["chat"], true);
                        let sentence = prompt.lines().nth(1).unwrap();
                        assert_eq!(units(by_text[sentence]).last().unwrap(), right);
                    }
                    _ => unreachable!(),
                }
            }
            // Test questions rest on test sentences only.
            for q in test {
                let p = q["prompt"].as_str().unwrap();
                for s in all.iter().filter(|s| p.contains(s.text.as_str())) {
                    assert!(in_test(&s.text), "{task}: {q}");
                }
            }
        }
        // Half of each split's questions are English.
        let langid_test = &tasks[0].test;
        let en = langid_test
            .iter()
            .filter(|q| q["prompt"].as_str().unwrap().is_ascii())
            .count();
        assert_eq!(en, 10);
    }

    #[test]
    fn a_corpus_without_chinese_is_refused_by_name() {
        let only_en: Vec<String> = corpus().into_iter().take(1).collect();
        let err = make_tasks(&sentences(&only_en), 10, 10, 1).unwrap_err();
        assert!(err.to_string().contains("Chinese"), "{err}");
    }
}
