//! `longwriter study`: workflows of the research this product grew out of.
//! `karel-data` makes the program-synthesis examples of the probing study;
//! `probe` measures, at each checkpoint of a model trained on them, how
//! often it writes a correct program and how well linear probes read the
//! robot's state from its hidden states (against an alternative semantics).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use lw_core::rng::Rng;
use lw_study::karel::{
    parse_program, program_text, random_example, run_as, unrolled, Example, GenOptions, Semantics,
    Stmt,
};
use lw_study::probe::{Probe, ProbeOptions};
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum StudyCommand {
    /// Karel-like program synthesis data for the probing study: each
    /// example is a specification (input/output grid worlds) and a program
    /// that maps one to the other. Writes OUT/train.jsonl ({"text"}, for
    /// `data tokenize` and `train pretrain`) and OUT/test.jsonl ({"text",
    /// "prompt", "program", "steps"}: held-out examples to generate
    /// programs for and to probe on).
    KarelData(KarelDataArgs),
    /// The probing study on a model trained on `karel-data` (`train
    /// pretrain` on its train.jsonl): for each checkpoint of the run (or
    /// one --model), the share of held-out specifications whose greedy
    /// program satisfies them, and per layer the held-out accuracy of
    /// linear probes for the robot's facing and position after each
    /// program token, read under the real semantics and under an
    /// alternative one (turns swapped: what a probe learns by itself).
    /// Writes OUT/results.jsonl (a rerun skips finished checkpoints),
    /// OUT/report.md and charts.
    Probe(ProbeArgs),
    /// Multiple-choice tasks for the checkpoint fine-tuning study, made
    /// from a corpus of English and Chinese text: language identification,
    /// a cloze test, sentence order, a paraphrase test (the original against
    /// a meaning-changing edit) and, asked as a chat turn, an instruction to
    /// follow (the last word of a sentence). Writes OUT/train/TASK.jsonl and
    /// OUT/test/TASK.jsonl for `eval mc` and `study checkpoints`; no test
    /// question rests on a sentence that training questions use.
    McTasks(crate::study_checkpoints::McTasksArgs),
    /// The checkpoint fine-tuning study: every checkpoint of a pretraining
    /// run evaluated on the tasks, fine-tuned on one of them with a fixed
    /// recipe, and evaluated again. Writes OUT/results.jsonl (a rerun
    /// repeats no finished evaluation or fine-tuning), OUT/sft/ and
    /// OUT/report.md with charts: gain on the task fine-tuned on and
    /// forgetting on the others, by pretraining step.
    Checkpoints(crate::study_checkpoints::CheckpointsArgs),
    /// Mini–giant collaboration: on a benchmark's prompts, AgentWrite with
    /// the giant planning and writing, the mini doing both, the giant
    /// planning while the mini writes, and the reverse (each a `write`
    /// run). Writes OUT/results.jsonl (a rerun keeps finished runs and
    /// resumes the rest) and OUT/report.md: S_l, repetition, time, and per
    /// role tokens, estimated compute and measured network bytes, set
    /// against the bytes federated learning would move (computed).
    Collaboration(crate::study_collab::CollaborationArgs),
}

#[derive(Args)]
pub struct ProbeArgs {
    /// A `train pretrain` output directory: every checkpoint-NNNNNNN in it.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    run: Option<PathBuf>,
    /// One model directory instead.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out examples: `karel-data`'s test.jsonl.
    #[arg(long)]
    data: PathBuf,
    /// Report directory.
    #[arg(long)]
    out: PathBuf,
    /// Examples whose hidden states the probes read (half fit them, half
    /// test them).
    #[arg(long, default_value_t = 200)]
    examples: usize,
    /// Examples a program is generated for.
    #[arg(long, default_value_t = 100)]
    generate: usize,
    #[command(flatten)]
    engine: crate::EngineArgs,
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
        StudyCommand::Probe(a) => probe(a),
        StudyCommand::McTasks(a) => crate::study_checkpoints::mc_tasks(a),
        StudyCommand::Checkpoints(a) => crate::study_checkpoints::checkpoints(a),
        StudyCommand::Collaboration(a) => crate::study_collab::collaboration(a),
    }
}

/// The models of a probing study: `(label, step, dir)` in step order.
fn probe_models(a: &ProbeArgs) -> anyhow::Result<Vec<(String, u64, PathBuf)>> {
    if let Some(m) = &a.model {
        return Ok(vec![(m.display().to_string(), 0, m.clone())]);
    }
    crate::train::run_checkpoints(a.run.as_ref().expect("--run or --model"))
}

fn probe(a: &ProbeArgs) -> anyhow::Result<()> {
    let mut examples = Vec::new();
    for (line, m) in lw_eval::items::objects(&a.data, false)? {
        let at = || format!("{}:{line}", a.data.display());
        let t = m
            .get("text")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: no \"text\"", at()))?;
        examples.push(Example::parse(t).with_context(|| format!("{}: not a Karel example", at()))?);
    }
    let (results_path, mut results) = crate::results::open(&a.out)?;
    for (label, step, dir) in probe_models(a)? {
        if results.iter().any(|r| r["model"] == label.as_str()) {
            eprintln!("{label}: done before, kept");
            continue;
        }
        let m = crate::ModelArgs {
            model: dir.display().to_string(),
            fallback_to_tiny: false,
            engine: a.engine.clone(),
        };
        let mut engine = crate::run::load_engine(&m)?;
        let generation =
            generation_accuracy(&mut engine, &examples[..a.generate.min(examples.len())])?;
        let probes = probe_layers(&engine, &examples, a.examples)?;
        let r = json!({
            "model": label,
            "step": step,
            "generation_accuracy": generation.0,
            "generated": generation.1,
            "probes": probes,
        });
        eprintln!(
            "{label}: step {step}, generation accuracy {:.3} over {}",
            generation.0, generation.1
        );
        results.push(r);
        crate::results::save(&results_path, &results)?;
    }
    results.sort_by_key(|r| r["step"].as_u64().unwrap_or(0));
    probe_report(&a.out, &results)?;
    eprintln!("report: {}", a.out.join("report.md").display());
    Ok(())
}

/// The share of `examples` whose greedy program (after "program:")
/// satisfies the specification, and how many were tried.
fn generation_accuracy(
    engine: &mut lw_engine::Engine,
    examples: &[Example],
) -> anyhow::Result<(f64, usize)> {
    let params = lw_core::GenerationParams {
        sampling: lw_core::SamplingParams::greedy(),
        max_tokens: Some(128),
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let mut hits = 0;
    for e in examples {
        let ids = engine.shared().encode_raw(&e.prompt())?;
        let out = engine.generate(&ids, &params, |_| true)?;
        if parse_program(&out.text).is_ok_and(|p| !p.is_empty() && e.satisfied_by(&p)) {
            hits += 1;
        }
    }
    Ok((hits as f64 / examples.len().max(1) as f64, examples.len()))
}

/// For the first `n` loop-free examples whose program runs under both
/// semantics on their first input: the hidden states at each program
/// token (its last token), and the robot's facing and cell after it under
/// each semantics. Probes fit on the first half and are scored on the
/// second, per layer.
fn probe_layers(
    engine: &lw_engine::Engine,
    examples: &[Example],
    n: usize,
) -> anyhow::Result<Vec<Value>> {
    let model = engine.shared();
    let llama = model.model();
    // [layer] → feature rows; labels per target.
    let mut features: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut labels: [Vec<usize>; 4] = Default::default();
    let mut boundary = 0;
    let mut used = 0;
    for e in examples {
        if used == n {
            break;
        }
        if e.program.iter().any(|s| matches!(s, Stmt::Repeat(..))) {
            continue;
        }
        let input = &e.spec[0].0;
        let (Ok((_, real)), Ok((_, alt))) = (
            run_as(input, &e.program, Semantics::Real),
            run_as(input, &e.program, Semantics::SwappedTurns),
        ) else {
            continue;
        };
        let text = e.to_text();
        let ids = model.encode_raw(&text)?;
        // The last token of each program word: the length of the text's
        // tokens up to the word's end (byte-level pieces split at spaces,
        // so a prefix's tokens are a prefix of the whole's).
        let start = text.rfind("program:").expect("a program") + "program:".len();
        let mut positions = Vec::new();
        let mut end = start;
        for word in text[start..].split(' ').filter(|w| !w.is_empty()) {
            end = text[end..]
                .find(word)
                .map(|i| end + i + word.len())
                .expect("the word");
            let prefix = model.encode_raw(&text[..end])?;
            if prefix.is_empty() || ids.get(..prefix.len()) != Some(&prefix[..]) {
                positions.clear();
                break;
            }
            positions.push(prefix.len() - 1);
        }
        if positions.len() != real.len() {
            continue;
        }
        let mut cache = llama.new_cache();
        let states = llama.hidden_states(&ids, &mut cache)?;
        let h = states[0].len() / ids.len();
        if features.is_empty() {
            features = vec![Vec::new(); states.len()];
        }
        for (k, &p) in positions.iter().enumerate() {
            for (layer, s) in states.iter().enumerate() {
                features[layer].push(s[p * h..(p + 1) * h].to_vec());
            }
            let cell = |r: &lw_study::karel::Robot| r.y * input.width + r.x;
            labels[0].push(real[k].facing.index());
            labels[1].push(alt[k].facing.index());
            labels[2].push(cell(&real[k]));
            labels[3].push(cell(&alt[k]));
        }
        used += 1;
        if used == n / 2 {
            boundary = labels[0].len();
        }
    }
    if used < 4 || boundary == 0 || boundary == labels[0].len() {
        anyhow::bail!("too few usable examples for probes ({used}); give more with --examples");
    }
    let cells = examples[0].spec[0].0.width * examples[0].spec[0].0.height;
    let o = ProbeOptions::default();
    let mut out = Vec::new();
    for (layer, xs) in features.iter().enumerate() {
        let (train, test) = xs.split_at(boundary);
        let mut row = json!({"layer": layer});
        for (t, (name, classes)) in [
            ("facing", 4),
            ("facing_alt", 4),
            ("position", cells),
            ("position_alt", cells),
        ]
        .into_iter()
        .enumerate()
        {
            let (ytrain, ytest) = labels[t].split_at(boundary);
            let probe = Probe::fit(train, ytrain, classes, &o)?;
            row[name] = json!(probe.accuracy(test, ytest));
        }
        out.push(row);
    }
    Ok(out)
}

/// report.md and its charts from the results, in step order.
fn probe_report(dir: &Path, results: &[Value]) -> anyhow::Result<()> {
    let mut md = String::from(
        "# Probing study\n\nPer checkpoint: the share of held-out specifications whose greedy \
         program satisfies them, and held-out accuracy of linear probes reading the robot's \
         facing (4 classes) and cell after each program token from each layer's hidden state, \
         under the real semantics and with turns swapped (the baseline: what a probe learns \
         by itself). Layer 0 is the embeddings.\n\n\
         | checkpoint | step | generation | layer | facing | facing (alt) | position | position (alt) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    for r in results {
        for p in r["probes"].as_array().into_iter().flatten() {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["model"].as_str().unwrap_or(""),
                r["step"],
                f(&r["generation_accuracy"]),
                p["layer"],
                f(&p["facing"]),
                f(&p["facing_alt"]),
                f(&p["position"]),
                f(&p["position_alt"]),
            ));
        }
    }
    let layers = results
        .last()
        .and_then(|r| r["probes"].as_array())
        .map_or(0, Vec::len);
    for (target, title) in [("facing", "Facing probes"), ("position", "Position probes")] {
        let mut series = vec![(
            "generation".to_string(),
            results
                .iter()
                .map(|r| {
                    (
                        r["step"].as_f64().unwrap_or(0.0),
                        r["generation_accuracy"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect(),
        )];
        for layer in 0..layers {
            for (suffix, key) in [("", target.to_string()), (" alt", format!("{target}_alt"))] {
                series.push((
                    format!("layer {layer}{suffix}"),
                    results
                        .iter()
                        .map(|r| {
                            (
                                r["step"].as_f64().unwrap_or(0.0),
                                r["probes"][layer][key.as_str()].as_f64().unwrap_or(0.0),
                            )
                        })
                        .collect(),
                ));
            }
        }
        lw_eval::report::line_chart(
            dir,
            &format!("probe-{target}"),
            title,
            "step",
            "accuracy",
            &series,
        )?;
        md.push_str(&format!("\n![{title}](probe-{target}.svg)\n"));
    }
    lw_core::fs::write_atomic(&dir.join("report.md"), md.as_bytes())
        .with_context(|| format!("writing {}", dir.join("report.md").display()))?;
    Ok(())
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
