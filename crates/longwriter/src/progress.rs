//! The one progress display of the command line: bars that count things
//! and spinners that show a status line, all drawn on stderr in one style
//! (indicatif draws nothing when stderr is not a terminal).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `len` things called `unit` (plural, e.g. "items",
/// "judged"): `{bar:30} {pos}/{len} UNIT  {elapsed} (eta {eta})  {msg}`.
/// The message is optional; `set_message` fills it in. A length of 0 can be
/// set later with `set_length`.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(bar_style(unit));
    bar
}

/// [`bar`], or a hidden one when `quiet` (nothing drawn, every call a no-op).
pub fn bar_unless(quiet: bool, len: u64, unit: &str) -> ProgressBar {
    if quiet {
        ProgressBar::hidden()
    } else {
        bar(len, unit)
    }
}

/// A spinner that ticks on its own and shows one status line:
/// `{spinner} {msg}`, the message set with `set_message`.
pub fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// [`spinner`], or a hidden one when `quiet`.
pub fn spinner_unless(quiet: bool) -> ProgressBar {
    if quiet {
        ProgressBar::hidden()
    } else {
        spinner()
    }
}

/// The style every bar shares, with its unit word.
fn bar_style(unit: &str) -> ProgressStyle {
    // Braces in a unit word would be read as template keys.
    let unit = unit.replace('{', "{{").replace('}', "}}");
    ProgressStyle::with_template(&format!(
        "{{bar:30}} {{pos}}/{{len}} {unit}  {{elapsed}} (eta {{eta}})  {{msg}}"
    ))
    .expect("valid template")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_counts_in_its_unit_and_a_hidden_one_draws_nothing() {
        let b = bar(10, "judged");
        assert_eq!(b.length(), Some(10));
        b.inc(3);
        assert_eq!(b.position(), 3);
        assert!(bar_unless(true, 10, "items").is_hidden());
        assert!(spinner_unless(true).is_hidden());
        assert_eq!(spinner_unless(true).length(), None);
    }

    #[test]
    fn odd_unit_words_still_make_a_valid_template() {
        let _ = bar_style("{weird}");
        let _ = bar_style("tensors");
    }
}
