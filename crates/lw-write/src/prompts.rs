//! The prompts of the method, in English and Chinese.
//!
//! The write prompt puts what stays the same between steps first
//! (instruction, plan, the text so far) and what changes last (the current
//! step), so a backend that keeps the KV cache of a shared prefix computes
//! each token of the document about once.

use crate::length::Language;
use crate::plan::Plan;

/// Asks for a paragraph-level plan. `problem` restates why the last plan was
/// refused.
pub fn plan_prompt(
    instruction: &str,
    asked: Option<u32>,
    lang: Language,
    problem: Option<&str>,
) -> String {
    let mut s = match lang {
        Language::English => {
            let mut s = format!(
                "You are planning a long piece of writing. Here is the writing task:\n\n{instruction}\n\n\
                 Break the piece into paragraphs. For each paragraph give its main point and how many words it \
                 should have (between 200 and 1000). Together the paragraphs must cover the whole task"
            );
            match asked {
                Some(n) => s.push_str(&format!(" and add up to about {n} words.\n\n")),
                None => s.push_str(".\n\n"),
            }
            s.push_str(
                "Answer with the plan only, one line per paragraph, in exactly this form:\n\
                 Paragraph 1 - Main Point: [what this paragraph says] - Word Count: [number] words\n\
                 Paragraph 2 - Main Point: [...] - Word Count: [number] words\n...",
            );
            s
        }
        Language::Chinese => {
            let mut s = format!(
                "你要为一篇长文制定写作计划。写作任务如下：\n\n{instruction}\n\n\
                 请把文章拆分成若干段落，为每一段写出主要内容和字数（每段 200 到 1000 字），所有段落合起来要完整覆盖写作任务"
            );
            match asked {
                Some(n) => s.push_str(&format!("，总字数约为 {n} 字。\n\n")),
                None => s.push_str("。\n\n"),
            }
            s.push_str(
                "只输出计划，每段一行，严格使用以下格式：\n\
                 段落1 - 主要内容：[这一段写什么] - 字数要求：[数字]字\n\
                 段落2 - 主要内容：[……] - 字数要求：[数字]字\n……",
            );
            s
        }
    };
    if let Some(p) = problem {
        match lang {
            Language::English => s.push_str(&format!(
                "\n\nYour previous plan could not be used: {p}. Write a corrected plan."
            )),
            Language::Chinese => s.push_str(&format!(
                "\n\n上一版计划无法使用：{p}。请给出修改后的计划。"
            )),
        }
    }
    s
}

/// A section without the marks the write prompt puts around the text so
/// far: a small model imitates them (SmolLM2-135M began 86 of 89 sections
/// with `<<<`, each copy teaching the next step to copy more, and under a
/// strong DRY it varies them into runs like `<<<<**>>>>`). Every run of
/// three or more `<`/`>` goes, a line it leaves without a letter or digit
/// goes with it, lines that are only the window's cut mark `[…]` go, and
/// the blank lines left close up. Prose with `<<` or `>>` stays whole.
pub fn without_prompt_marks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for raw in text.lines() {
        let line = without_mark_runs(raw);
        let emptied = line.len() != raw.len() && !line.chars().any(char::is_alphanumeric);
        if emptied || line.trim() == crate::window::CUT_MARK.trim() || line.trim().is_empty() {
            blank += usize::from(line.trim().is_empty() && !emptied);
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line.trim_end());
    }
    out.trim().to_string()
}

/// `line` without its runs of three or more `<`/`>` (and the space a run
/// leaves doubled).
fn without_mark_runs(line: &str) -> std::borrow::Cow<'_, str> {
    let mark = |b: &u8| *b == b'<' || *b == b'>';
    if !line.as_bytes().windows(3).any(|w| w.iter().all(mark)) {
        return line.into();
    }
    let mut out = String::with_capacity(line.len());
    // Where the current run of marks started, and whether a run was just cut.
    let mut run: Option<usize> = None;
    let mut cut = false;
    for (i, c) in line.char_indices() {
        if c == '<' || c == '>' {
            run.get_or_insert(i);
            continue;
        }
        if let Some(start) = run.take() {
            if i - start >= 3 {
                cut = true;
            } else {
                out.push_str(&line[start..i]);
            }
        }
        if cut && c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        cut = false;
        out.push(c);
    }
    if let Some(start) = run.filter(|&start| line.len() - start < 3) {
        out.push_str(&line[start..]);
    }
    out.trim().to_string().into()
}

/// Asks for paragraph `step` (0-based) given everything written before it.
pub fn write_prompt(
    instruction: &str,
    plan: &Plan,
    written: &str,
    step: usize,
    lang: Language,
) -> String {
    let para = &plan.paragraphs[step];
    let last = step + 1 == plan.paragraphs.len();
    match lang {
        Language::English => {
            let mut s = format!(
                "You are writing a long piece, one paragraph at a time.\n\nThe writing task:\n{instruction}\n\n\
                 The plan:\n{}\nThe text written so far:\n<<<\n{written}\n>>>\n\n",
                plan.to_text()
            );
            s.push_str(&format!(
                "Now write paragraph {} of {}: {} It should have about {} words. Write only this paragraph \
                 (a short subtitle is allowed); continue naturally from the text so far without repeating it.",
                step + 1,
                plan.paragraphs.len(),
                para.main_point,
                para.words
            ));
            if !last {
                s.push_str(" Do not conclude or hint at what comes next: the piece goes on after this paragraph.");
            }
            s
        }
        Language::Chinese => {
            let mut s = format!(
                "你正在逐段写一篇长文。\n\n写作任务：\n{instruction}\n\n写作计划：\n{}\n已经写好的内容：\n<<<\n{written}\n>>>\n\n",
                plan.to_text()
            );
            s.push_str(&format!(
                "现在请写第 {} 段（共 {} 段）：{} 这一段约 {} 字。只写这一段（可以有一个简短的小标题），紧接上文自然展开，不要重复已写的内容。",
                step + 1,
                plan.paragraphs.len(),
                para.main_point,
                para.words
            ));
            if !last {
                s.push_str("不要写总结，也不要预告下文：文章在这一段之后还会继续。");
            }
            s
        }
    }
}

/// A one-pass request for models trained to write long (`--mode direct`).
pub fn direct_prompt(instruction: &str) -> String {
    instruction.to_string()
}

/// Token budget of a step: enough for its words with headroom, never a fixed cap.
pub fn max_tokens_for(words: u32, lang: Language) -> usize {
    // English runs about 1.3–1.5 tokens a word; Chinese about 1–1.5 a character.
    let per_word = match lang {
        Language::English => 2.0,
        Language::Chinese => 1.8,
    };
    (words as f64 * per_word).ceil() as usize + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Paragraph;

    fn plan() -> Plan {
        Plan {
            paragraphs: vec![
                Paragraph {
                    main_point: "Origins.".into(),
                    words: 300,
                },
                Paragraph {
                    main_point: "Spread.".into(),
                    words: 400,
                },
            ],
        }
    }

    #[test]
    fn consecutive_write_prompts_share_everything_before_the_step() {
        let p = plan();
        let a = write_prompt(
            "Write about print.",
            &p,
            "First paragraph.",
            1,
            Language::English,
        );
        let b = write_prompt(
            "Write about print.",
            &p,
            "First paragraph.\n\nSecond.",
            1,
            Language::English,
        );
        let step_at = a.find("Now write").unwrap();
        // Only the text so far grows, and it ends before the step.
        assert!(b.starts_with(&a[..a.find(">>>").unwrap() - 1]));
        assert!(a[step_at..].contains("paragraph 2 of 2"));
        assert!(
            !a[step_at..].contains("Do not conclude"),
            "the last step may conclude"
        );
        let first = write_prompt("Write about print.", &p, "", 0, Language::English);
        assert!(first.contains("Do not conclude"));
    }

    #[test]
    fn the_prompts_marks_are_taken_out_of_a_section() {
        let copied = "<<<\n\nThe river rose.\n<<< <<<\n>>>\n\n[…]\n\nIt fell again.\nStill.\n>>>";
        assert_eq!(
            without_prompt_marks(copied),
            "The river rose.\n\nIt fell again.\nStill."
        );
        assert_eq!(without_prompt_marks("<<< The mill >>>"), "The mill");
        // Varied runs go, and a line they leave without words goes too.
        assert_eq!(
            without_prompt_marks(
                "<<<<**>>>><<==\nThe writing goes on>><<<<<<<< here.\n<<<<<<<<I>>>>"
            ),
            "The writing goes on here.\nI"
        );
        // Prose that merely holds the characters stays whole.
        let prose = "Shift left with a << b, or write x >> 2, a <> b.\n\nNext>>";
        assert_eq!(without_prompt_marks(prose), prose);
        assert_eq!(without_prompt_marks("<<<\n>>>"), "");
    }

    #[test]
    fn chinese_prompts_for_chinese_instructions() {
        let s = plan_prompt(
            "写一篇一万字的文章",
            Some(10000),
            Language::Chinese,
            Some("总字数不足"),
        );
        assert!(s.contains("10000 字") && s.contains("段落1") && s.contains("总字数不足"));
    }

    #[test]
    fn budgets_scale_with_words() {
        assert!(
            max_tokens_for(1000, Language::English)
                > 2 * max_tokens_for(400, Language::English) - 100
        );
    }
}
