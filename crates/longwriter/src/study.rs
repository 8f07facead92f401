//! `longwriter study`: workflows of the research this product grew out of.
//! `karel-data` makes the program-synthesis examples of the probing study.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use lw_core::rng::Rng;
use lw_study::karel::{program_text, random_example, unrolled, GenOptions};

#[derive(Subcommand)]
pub enum StudyCommand {
    /// Karel-like program synthesis data for the probing study: each
    /// example is a specification (input/output grid worlds) and a program
    /// that maps one to the other. Writes OUT/train.jsonl ({"text"}, for
    /// `data tokenize` and `train pretrain`) and OUT/test.jsonl ({"text",
    /// "prompt", "program", "steps"}: held-out examples to generate
    /// programs for and to probe on).
    KarelData(KarelDataArgs),
}

#[derive(Args)]
pub struct KarelDataArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Training examples.
    #[arg(long, default_value_t = 20_000)]
    train: usize,
    /// Held-out examples.
    #[arg(long, default_value_t = 500)]
    test: usize,
    /// Grid width and height.
    #[arg(long, default_value_t = 6)]
    size: usize,
    /// Primitives per program, at most (at least 3).
    #[arg(long, default_value_t = 8)]
    max_len: usize,
    /// Input/output pairs per specification.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Programs may hold `repeat N { … }` loops.
    #[arg(long)]
    loops: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(cmd: &StudyCommand) -> anyhow::Result<()> {
    match cmd {
        StudyCommand::KarelData(a) => karel_data(a),
    }
}

fn karel_data(a: &KarelDataArgs) -> anyhow::Result<()> {
    if !(2..=16).contains(&a.size) {
        anyhow::bail!("--size {}: grids of 2 to 16 cells a side", a.size);
    }
    if a.max_len < 3 || a.pairs == 0 {
        anyhow::bail!("--max-len must be at least 3 and --pairs at least 1");
    }
    let o = GenOptions {
        width: a.size,
        height: a.size,
        min_len: 3,
        max_len: a.max_len,
        pairs: a.pairs,
        loops: a.loops,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut rng = Rng::new(a.seed);
    let mut seen = std::collections::HashSet::new();
    for (name, n, held_out) in [("train", a.train, false), ("test", a.test, true)] {
        let mut text = String::new();
        let mut made = 0;
        let mut tries = 0;
        while made < n {
            tries += 1;
            if tries > n * 50 + 1000 {
                anyhow::bail!("could not make {n} distinct {name} examples with these settings");
            }
            let Some(e) = random_example(&mut rng, &o) else {
                continue;
            };
            // Held-out examples share no specification with training.
            if !seen.insert(e.prompt()) {
                continue;
            }
            let line = if held_out {
                serde_json::json!({
                    "text": e.to_text(),
                    "prompt": e.prompt(),
                    "program": program_text(&e.program),
                    "steps": unrolled(&e.program).len(),
                })
            } else {
                serde_json::json!({"text": e.to_text()})
            };
            text.push_str(&line.to_string());
            text.push('\n');
            made += 1;
        }
        let path = a.out.join(format!("{name}.jsonl"));
        lw_core::fs::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("{}: {n} examples", path.display());
    }
    Ok(())
}
