//! Reasoning models (Qwen3, DeepSeek-R1 and their kin) may think before
//! they answer, inside `<think>…</think>`. The thinking is not part of the
//! document: it is split off here, and a run may keep it in a side file.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// `text` without its thinking, and the thinking (blocks joined by blank
/// lines). Handles several blocks, a block never closed (the generation
/// ended while thinking: all of it is thinking) and a closing tag with no
/// opening one (a template that opened the block in the prompt: what comes
/// before it is thinking).
pub fn split_thinking(text: &str) -> (String, String) {
    let mut answer = String::new();
    let mut thoughts: Vec<&str> = Vec::new();
    let mut rest = text;
    // A close before any open: the block was opened in the prompt.
    if let Some(close) = rest.find(CLOSE) {
        if rest[..close].find(OPEN).is_none() {
            thoughts.push(rest[..close].trim());
            rest = &rest[close + CLOSE.len()..];
        }
    }
    while let Some(open) = rest.find(OPEN) {
        answer.push_str(&rest[..open]);
        let inside = &rest[open + OPEN.len()..];
        match inside.find(CLOSE) {
            Some(close) => {
                thoughts.push(inside[..close].trim());
                rest = &inside[close + CLOSE.len()..];
            }
            None => {
                thoughts.push(inside.trim());
                rest = "";
            }
        }
    }
    answer.push_str(rest);
    let thoughts: Vec<&str> = thoughts.into_iter().filter(|t| !t.is_empty()).collect();
    (answer.trim().to_string(), thoughts.join("\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_is_split_off_in_every_shape() {
        assert_eq!(
            split_thinking("<think>\nplan the river\n</think>\n\nThe river runs."),
            ("The river runs.".into(), "plan the river".into())
        );
        // An empty block (thinking switched off) leaves no thoughts.
        assert_eq!(
            split_thinking("<think>\n\n</think>\n\nText."),
            ("Text.".into(), String::new())
        );
        // Opened in the prompt: only the close is generated.
        assert_eq!(
            split_thinking("first thoughts</think>Answer <think>more</think>here."),
            ("Answer here.".into(), "first thoughts\n\nmore".into())
        );
        // Cut off while thinking: nothing of it is the answer.
        assert_eq!(
            split_thinking("Intro. <think>still going"),
            ("Intro.".into(), "still going".into())
        );
        // No tags at all.
        assert_eq!(
            split_thinking("  Plain text.  "),
            ("Plain text.".into(), String::new())
        );
    }
}
