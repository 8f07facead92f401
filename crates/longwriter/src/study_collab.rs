//! The mini–giant collaboration study: a strong ("giant") model plans and
//! a small ("mini") one writes, against either alone and the reverse, on a
//! benchmark's prompts. Each piece is a `longwriter write --json` run of
//! this same binary (the product's own path: planner flags, per-role
//! accounting, resume); the study gathers their summaries into a four-way
//! table and sets the measured traffic against what federated learning
//! would move to adapt the mini model instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

/// The four ways to split the work: (name, who plans, who writes).
const CONFIGS: [(&str, Role, Role); 4] = [
    ("all-giant", Role::Giant, Role::Giant),
    ("all-mini", Role::Mini, Role::Mini),
    ("giant-plans", Role::Giant, Role::Mini),
    ("mini-plans", Role::Mini, Role::Giant),
];

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Giant,
    Mini,
}

#[derive(Args)]
pub struct CollaborationArgs {
    /// The giant as a local model (directory, GGUF file or hub id).
    #[arg(long, required_unless_present = "giant_api_base")]
    giant: Option<String>,
    /// The giant on an OpenAI-compatible server instead (the case the study
    /// is about: a giant far away).
    #[arg(long, conflicts_with = "giant")]
    giant_api_base: Option<String>,
    /// Model name on the giant's server.
    #[arg(long, default_value = "default")]
    giant_api_model: String,
    /// Bearer token for the giant's server.
    #[arg(long, hide_env_values = true)]
    giant_api_key: Option<String>,
    /// The giant's parameters for the compute estimate where its server
    /// cannot say (135M, 70B, or a number).
    #[arg(long, value_parser = crate::write::parse_parameters)]
    giant_params: Option<u64>,
    /// The mini model, local (directory, GGUF file, hub id or `tiny`).
    #[arg(long)]
    mini: String,
    /// Benchmark: JSON lines {"prompt", "length"[, "id"]}.
    #[arg(long, default_value = "data/eval/longbench-lw.jsonl")]
    bench: PathBuf,
    /// Only these items (comma-separated ids).
    #[arg(long)]
    ids: Option<String>,
    /// Only the first N items (after --ids).
    #[arg(long)]
    limit: Option<usize>,
    /// Configurations to run (comma-separated): all-giant, all-mini,
    /// giant-plans, mini-plans.
    #[arg(long, default_value = "all-giant,all-mini,giant-plans,mini-plans")]
    configs: String,
    /// Report directory: runs/CONFIG/ID (each a `write` run directory),
    /// results.jsonl (a rerun keeps finished runs and resumes unfinished
    /// ones), report.md.
    #[arg(long)]
    out: PathBuf,
    /// Federated-learning rounds for the computed comparison.
    #[arg(long, default_value_t = 10)]
    fl_rounds: u64,
    /// Bytes per parameter of a federated model update (2: f16).
    #[arg(long, default_value_t = 2.0)]
    fl_bytes_per_param: f64,
    /// Sampling temperature (the evaluation's 0.5 by default).
    #[arg(long, default_value_t = 0.5)]
    temperature: f32,
    /// Nucleus sampling threshold (the evaluation's 0.8 by default).
    #[arg(long, default_value_t = 0.8)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads of the local models.
    #[arg(long)]
    threads: Option<usize>,
    /// DRY strength of every run (as `write --dry-multiplier`).
    #[arg(long)]
    dry_multiplier: Option<f32>,
}

impl CollaborationArgs {
    /// `write` flags for a run where `plan` plans and `writer` writes.
    fn backend_flags(&self, plan: Role, writer: Role) -> Vec<String> {
        let mut f: Vec<String> = Vec::new();
        // A role's flags: the writer's (`--model`, `--api-base`, …) or,
        // with the `plan-` prefix, the planner's.
        let mut role = |who: Role, prefix: &str| {
            let mut flag = |name: &str, value: String| {
                f.extend([format!("--{prefix}{name}"), value]);
            };
            match (who, &self.giant, &self.giant_api_base) {
                (Role::Mini, _, _) => flag("model", self.mini.clone()),
                (Role::Giant, Some(m), _) => flag("model", m.clone()),
                (Role::Giant, None, Some(base)) => {
                    flag("api-base", base.clone());
                    flag("api-model", self.giant_api_model.clone());
                    if let Some(k) = &self.giant_api_key {
                        flag("api-key", k.clone());
                    }
                    if let Some(p) = self.giant_params {
                        flag("params", p.to_string());
                    }
                }
                (Role::Giant, None, None) => {}
            }
        };
        role(writer, "");
        if plan != writer {
            role(plan, "plan-");
        }
        if let Some(t) = self.threads {
            f.extend(["--threads".into(), t.to_string()]);
        }
        f
    }

    fn giant_name(&self) -> String {
        self.giant
            .clone()
            .or_else(|| self.giant_api_base.clone())
            .unwrap_or_default()
    }
}

/// One finished run's row of results.
fn row(config: &str, item: &lw_eval::Item, summary: &Value, document: &str) -> Value {
    let rep = lw_eval::Repetition::of(document);
    json!({
        "config": config,
        "id": item.id,
        "length": item.length,
        "delivered_words": summary["delivered_words"],
        "length_score": summary["length_score"],
        "seq_rep_4": rep.seq_rep_4,
        "degenerate": rep.degenerate,
        "seconds": summary["seconds"],
        "plan": summary["roles"]["plan"],
        "write": summary["roles"]["write"],
    })
}

/// Runs `write` for one item and configuration; its summary, or the error
/// it printed.
fn run_write(
    a: &CollaborationArgs,
    dir: &Path,
    item: &lw_eval::Item,
    plan: Role,
    writer: Role,
) -> anyhow::Result<Result<Value, String>> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = Command::new(exe);
    cmd.args(["write", "--json"]);
    cmd.args(a.backend_flags(plan, writer));
    if dir.join("state.json").exists() || dir.join("request.json").exists() {
        cmd.arg("--resume").arg(dir);
    } else {
        cmd.args(["--temperature", &a.temperature.to_string()]);
        cmd.args(["--top-p", &a.top_p.to_string()]);
        cmd.args(["--seed", &a.seed.to_string()]);
        if let Some(d) = a.dry_multiplier {
            cmd.args(["--dry-multiplier", &d.to_string()]);
        }
        cmd.arg("--out").arg(dir).arg(&item.prompt);
    }
    let out = cmd.output().context("running longwriter write")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary");
    match summary {
        Some(s) if out.status.success() => Ok(Ok(s)),
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            Ok(Err(err.lines().last().unwrap_or("no summary").to_string()))
        }
    }
}

pub fn collaboration(a: &CollaborationArgs) -> anyhow::Result<()> {
    let mut items = lw_eval::read_items(&a.bench)?;
    if let Some(ids) = &a.ids {
        let want: Vec<&str> = ids.split(',').map(str::trim).collect();
        for id in &want {
            if !items.iter().any(|i| i.id == *id) {
                anyhow::bail!("--ids: {} has no item {id}", a.bench.display());
            }
        }
        items.retain(|i| want.contains(&i.id.as_str()));
    }
    items.truncate(a.limit.unwrap_or(usize::MAX));
    let configs: Vec<(&str, Role, Role)> = a
        .configs
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            CONFIGS
                .iter()
                .copied()
                .find(|k| k.0 == c)
                .with_context(|| {
                    format!(
                        "--configs: no configuration \"{c}\" (all-giant, all-mini, giant-plans, mini-plans)"
                    )
                })
        })
        .collect::<anyhow::Result<_>>()?;
    let (results_path, mut results) = crate::results::open(&a.out)?;
    for &(config, plan, writer) in &configs {
        for item in &items {
            let this = |r: &Value| r["config"] == config && r["id"] == item.id.as_str();
            if results.iter().any(|r| this(r) && r.get("error").is_none()) {
                eprintln!("{config} {}: done before, kept", item.id);
                continue;
            }
            // A failed run is tried again (resumed where it stopped).
            results.retain(|r| !this(r));
            let dir = a.out.join("runs").join(config).join(&item.id);
            std::fs::create_dir_all(dir.parent().unwrap_or(&a.out))
                .with_context(|| format!("creating {}", dir.display()))?;
            let r = match run_write(a, &dir, item, plan, writer)? {
                Ok(summary) => {
                    let doc_path = summary["document"]
                        .as_str()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| dir.join("document.md"));
                    let document = std::fs::read_to_string(&doc_path)
                        .with_context(|| format!("reading {}", doc_path.display()))?;
                    row(config, item, &summary, &document)
                }
                Err(e) => json!({"config": config, "id": item.id, "error": e}),
            };
            eprintln!(
                "{config} {}: {}",
                item.id,
                match r["length_score"].as_f64() {
                    Some(s) => format!(
                        "S_l {s:.1}, {} words of {}, {:.0}s",
                        r["delivered_words"],
                        item.length,
                        r["seconds"].as_f64().unwrap_or(0.0)
                    ),
                    None => format!("failed: {}", r["error"].as_str().unwrap_or("")),
                }
            );
            results.push(r);
            crate::results::save(&results_path, &results)?;
        }
    }
    report(a, &configs, &items, &results)?;
    eprintln!("report: {}", a.out.join("report.md").display());
    Ok(())
}

/// Sums of one role's figures over a configuration's runs.
#[derive(Default)]
struct RoleSums {
    tokens_in: f64,
    tokens_out: f64,
    flops: f64,
    flops_known: bool,
    sent: f64,
    received: f64,
    params: Option<f64>,
}

impl RoleSums {
    fn add(&mut self, v: &Value) {
        self.tokens_in += v["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);
        self.tokens_out += v["usage"]["completion_tokens"].as_f64().unwrap_or(0.0);
        if let Some(f) = v["flops"].as_f64() {
            self.flops += f;
            self.flops_known = true;
        }
        self.sent += v["bytes_sent"].as_f64().unwrap_or(0.0);
        self.received += v["bytes_received"].as_f64().unwrap_or(0.0);
        if let Some(p) = v["parameters"].as_f64() {
            self.params = Some(p);
        }
    }

    fn cells(&self) -> String {
        format!(
            "{:.0} / {:.0} | {} | {:.0} / {:.0}",
            self.tokens_in,
            self.tokens_out,
            if self.flops_known {
                format!("{:.3}", self.flops / 1e12)
            } else {
                "?".into()
            },
            self.sent,
            self.received
        )
    }
}

fn report(
    a: &CollaborationArgs,
    configs: &[(&str, Role, Role)],
    items: &[lw_eval::Item],
    results: &[Value],
) -> anyhow::Result<()> {
    let name = |r: Role| match r {
        Role::Giant => "giant",
        Role::Mini => "mini",
    };
    let mut md = format!(
        "# Mini–giant collaboration\n\n\
         Giant: `{}`. Mini: `{}`. {} prompts of `{}`; each run is `longwriter write` \
         (AgentWrite: plan, then sections), temperature {}, top-p {}, seed {}. S_l is the length score; \
         seq-rep-4 and degenerate as `eval length` gives them; tokens, compute (2 × parameters × \
         tokens computed) and bytes are per role, summed over the prompts; bytes are measured \
         on the network (0 for a local model).\n\n\
         | configuration | plans | writes | done | S_l | seq-rep-4 | degenerate | seconds | \
         plan: tokens in / out | plan: TFLOP | plan: bytes sent / received | \
         write: tokens in / out | write: TFLOP | write: bytes sent / received |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        a.giant_name(),
        a.mini,
        items.len(),
        a.bench.display(),
        a.temperature,
        a.top_p,
        a.seed
    );
    let mut traffic = Vec::new();
    let mut mini_params = None;
    for &(config, plan, writer) in configs {
        let rows: Vec<&Value> = results
            .iter()
            .filter(|r| r["config"] == config && r.get("length_score").is_some())
            .filter(|r| items.iter().any(|i| r["id"] == i.id.as_str()))
            .collect();
        let n = rows.len().max(1) as f64;
        let mean = |k: &str| rows.iter().filter_map(|r| r[k].as_f64()).sum::<f64>() / n;
        let degenerate = rows.iter().filter(|r| r["degenerate"] == true).count();
        let (mut p, mut w) = (RoleSums::default(), RoleSums::default());
        for r in &rows {
            p.add(&r["plan"]);
            w.add(&r["write"]);
        }
        if writer == Role::Mini {
            mini_params = mini_params.or(w.params);
        }
        if plan == Role::Mini {
            mini_params = mini_params.or(p.params);
        }
        traffic.push((
            config,
            p.sent + p.received + w.sent + w.received,
            rows.len(),
        ));
        md.push_str(&format!(
            "| {config} | {} | {} | {}/{} | {:.1} | {:.3} | {degenerate} | {:.0} | {} | {} |\n",
            name(plan),
            name(writer),
            rows.len(),
            items.len(),
            mean("length_score"),
            mean("seq_rep_4"),
            rows.iter()
                .filter_map(|r| r["seconds"].as_f64())
                .sum::<f64>(),
            p.cells(),
            w.cells()
        ));
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.get("error").is_some())
        .map(|r| {
            format!(
                "- {} {}: {}\n",
                r["config"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or(""),
                r["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !failed.is_empty() {
        md.push_str("\nRuns that failed (rerun to retry them):\n\n");
        md.push_str(&failed.concat());
    }
    md.push_str(
        "\n## Traffic against federated learning\n\n\
         Measured: the bytes each configuration moved over the network for its prompts. \
         Computed, not measured: federated learning would adapt the mini model instead by \
         sending each round a full model update down and one up, ",
    );
    match mini_params {
        Some(params) => {
            let per_round = 2.0 * params * a.fl_bytes_per_param;
            md.push_str(&format!(
                "{:.0} parameters × {} bytes × 2 = {:.1} MB per client per round; over {} rounds \
                 {:.1} MB per client, whatever the number of documents (the ratio is federated \
                 bytes over measured ones).\n\n\
                 | configuration | prompts | measured bytes | per prompt | federated bytes ({} rounds) | ratio |\n\
                 | --- | --- | --- | --- | --- | --- |\n",
                params,
                a.fl_bytes_per_param,
                per_round / 1e6,
                a.fl_rounds,
                per_round * a.fl_rounds as f64 / 1e6,
                a.fl_rounds
            ));
            for (config, bytes, n) in traffic {
                let fl = per_round * a.fl_rounds as f64;
                md.push_str(&format!(
                    "| {config} | {n} | {bytes:.0} | {:.0} | {fl:.0} | {} |\n",
                    bytes / n.max(1) as f64,
                    if bytes > 0.0 {
                        format!("{:.0}×", fl / bytes)
                    } else {
                        "no traffic (all local)".into()
                    }
                ));
            }
        }
        None => {
            md.push_str("the mini model's parameter count is unknown, so it is not computed.\n")
        }
    }
    let path = a.out.join("report.md");
    lw_core::fs::write_atomic(&path, md.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
