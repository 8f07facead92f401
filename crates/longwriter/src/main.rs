//! `longwriter`: the command line. It parses arguments, wires the library
//! crates together, shows progress and figures, and turns errors into
//! messages and exit codes. Model internals live in the library crates.

mod bench;
mod data;
mod eval;
mod interrupt;
mod progress;
mod results;
mod run;
mod study;
mod study_checkpoints;
mod study_collab;
mod synth;
mod train;
mod write;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "longwriter",
    version,
    about = "Plan and write very long documents with a local LLM engine or any OpenAI-compatible server",
    long_about = "longwriter runs large language models on the CPU (Llama 2/3/3.1/3.2, Mistral, \
                  Mixtral, Qwen2/2.5, Qwen3, Qwen3-MoE, Phi-3/4, Gemma 2/3, GLM-4 and GLM-4-0414, \
                  from Hugging Face checkpoints or GGUF files) and, on top of them, the LongWriter \
                  plan-then-write method for 10,000+ word outputs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Plan and write a long document (AgentWrite), resumably, into a run directory.
    Write(write::WriteArgs),
    /// Print the paragraph plan for an instruction (edit it, then `write --plan FILE`).
    Plan(write::PlanArgs),
    /// Continue a prompt (or answer it with --chat), streaming the text to stdout.
    Generate(GenerateArgs),
    /// Talk to a model in a multi-turn conversation on the terminal.
    Chat(ChatArgs),
    /// Measure prefill and decode speed and peak memory on a model.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming).
    Serve(ServeArgs),
    /// Count the words of a text (the number alone on the first line).
    Count(CountArgs),
    /// Print the token ids of a text on one line, comma-separated (or with
    /// --detokenize the text of ids). Only the tokenizer is loaded: a
    /// vocabulary-only GGUF file will do.
    Tokenize(TokenizeArgs),
    /// Evaluate long outputs: generate for a benchmark, score length and quality.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Tokenizers: train a byte-level BPE vocabulary.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Data: build long-output SFT data with AgentWrite (build, export,
    /// stats, select), tokenize a corpus, make synthetic AgentWrite data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train models: pretraining from scratch, supervised fine-tuning (full or LoRA).
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// LoRA adapters: merge into the base model.
    #[command(subcommand)]
    Lora(train::LoraCommand),
    /// Write a Hugging Face checkpoint as a GGUF file (llama.cpp's format),
    /// quantized or not; `--model FILE.gguf` runs it. Every family the
    /// engine runs (experts as llama.cpp's stacked `ffn_*_exps` tensors,
    /// Gemma's norms as 1 + w), as llama.cpp reads it; a config llama.cpp
    /// would read as another model is refused with the field named.
    Convert(ConvertArgs),
    /// Compute the logits of a sequence of token ids (every position), to
    /// compare with another engine on the same model file.
    Score(ScoreArgs),
    /// Studies: workflows of the research this product grew out of.
    #[command(subcommand)]
    Study(study::StudyCommand),
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Write the logits here as little-endian f32, `[positions, vocab]`;
    /// without it, each position's top token and logit are printed.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn score(a: &ScoreArgs) -> anyhow::Result<()> {
    let mut engine = run::load_engine(&a.model)?;
    let rows = engine.score(&a.ids)?;
    match &a.out {
        Some(path) => {
            let bytes: Vec<u8> = rows
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} positions × {} logits to {}",
                rows.len(),
                rows.first().map_or(0, Vec::len),
                path.display()
            );
        }
        None => {
            for (i, r) in rows.iter().enumerate() {
                let (best, v) = r
                    .iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .unwrap_or((0, &0.0));
                println!("{i}\t{best}\t{v:.4}");
            }
        }
    }
    Ok(())
}

#[derive(Args)]
struct ConvertArgs {
    /// Model directory (config.json, *.safetensors, tokenizer.json) or hub id.
    model: String,
    /// Output file (.gguf); written to a temporary file, then renamed.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Tensor type: q4_k_m (llama.cpp's mix of Q4_K and Q6_K), q5_k_m,
    /// q8_0, q4_k, q5_k, q6_k, q4_0, f16, bf16 or f32. Norms stay f32;
    /// matrices whose rows are not whole blocks fall back to Q8_0 or F16.
    #[arg(long = "type", default_value = "q8_0")]
    qtype: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write long answers for a file of instructions with AgentWrite, many
    /// at once, against one or more OpenAI-compatible servers (--api-base,
    /// repeatable) or the local engine. Everything is kept in DIR/data.sqlite:
    /// kill it at any moment and rerun the same command to continue (no
    /// finished section is written again). Items pass quality gates
    /// (length, sections, repetition, refusals, language) or are kept as
    /// rejected with the reason. Ctrl-C drains (items in flight finish);
    /// a second Ctrl-C stops at once.
    Build(Box<data::BuildArgs>),
    /// Write a build's accepted items as chat JSONL ({"messages": [user,
    /// assistant]}, LongWriter-6k's format, for `train sft`), optionally
    /// mixed with general SFT data and shuffled.
    Export(data::ExportArgs),
    /// Counts, rejection reasons, tokens, throughput and a length histogram
    /// of a build.
    Stats(data::StatsArgs),
    /// Keep the instructions of a JSONL file that ask for a long output
    /// (a stated length of at least --min-words).
    Select(data::SelectArgs),
    /// Tokenize text files (a whole file is one document) and JSONL files
    /// (each line's "text" is one) into OUT/train-*.bin, OUT/val-*.bin and
    /// OUT/meta.json, documents separated by the end-of-text token.
    Tokenize(DataTokenizeArgs),
    /// Make synthetic AgentWrite fine-tuning data from text: runs of
    /// consecutive paragraphs become documents whose plan lists each
    /// paragraph's first sentence and real length; writes chat JSONL (one
    /// planning and one writing conversation per paragraph) for `train sft`.
    Synth(DataSynthArgs),
}

#[derive(Args)]
struct DataSynthArgs {
    /// Inputs: .txt files and .jsonl files (their "text" fields, joined by blank lines).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
    /// Keep at most this many documents (after a seeded shuffle).
    #[arg(long)]
    max_documents: Option<usize>,
    /// Paragraphs per document, as MIN-MAX.
    #[arg(long, default_value = "3-5")]
    paragraphs: String,
    /// Paragraph length in words (characters for Chinese), as MIN-MAX.
    #[arg(long, default_value = "20-300")]
    words: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DataTokenizeArgs {
    /// Inputs: .txt (or any text) and .jsonl files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Directory with tokenizer.json (e.g. from `longwriter tokenizer train`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Share of documents (by content hash, so the split is stable) for validation.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Learn a byte-level BPE vocabulary from text files; writes tokenizer.json
    /// and tokenizer_config.json (special tokens, ChatML chat template).
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
struct TokenizerTrainArgs {
    /// Text files to learn from (UTF-8).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Directory to write the tokenizer into.
    #[arg(long)]
    out: PathBuf,
    /// Vocabulary size, the 256 byte tokens and special tokens included.
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Special tokens in id order (repeatable); default <|endoftext|>,
    /// <|im_start|>, <|im_end|> (the ChatML template needs the last two).
    #[arg(long = "special")]
    special: Vec<String>,
    /// model_max_length in tokenizer_config.json.
    #[arg(long, default_value_t = 32768)]
    max_length: usize,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (the page asks for it).
    #[arg(long, env = "LONGWRITER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file of accepted API keys, one per line (`#` starts a comment);
    /// combined with --api-key.
    #[arg(long, value_name = "FILE")]
    keys_file: Option<PathBuf>,
    /// Where long-writing jobs are kept (an SQLite file, jobs.sqlite).
    /// Default: $XDG_DATA_HOME/longwriter or ~/.local/share/longwriter.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 32768)]
    max_new_tokens: usize,
    /// Longest prompt accepted, in tokens (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest request body in bytes (larger ones get 413).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Long-writing jobs one API key may have queued or running at once.
    #[arg(long, default_value_t = 4)]
    max_jobs_per_key: usize,
    /// The model's name in /v1/models (default: the model directory's name or
    /// the hub id). Requests may also name it as given to --model, or "default".
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for the batch before new ones get 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds a connection has to send a request's headers; a client
    /// that trickles them is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Connections served at once; one more is answered 503 with
    /// Retry-After and closed.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

#[derive(Args)]
struct CountArgs {
    /// `unicode`: words of space-separated scripts plus one per CJK
    /// character (the default for budgets); `longbench`: LongBench-Write's
    /// definition, for comparable length scores.
    #[arg(long, default_value = "unicode", value_parser = ["unicode", "longbench"])]
    counter: String,
    /// File to count; `-` or nothing reads stdin.
    file: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Model directory, GGUF file or hub id whose tokenizer to use.
    #[arg(long, short = 'm', env = "LONGWRITER_MODEL")]
    model: String,
    /// Print a JSON array of {"id", "piece"} instead.
    #[arg(long)]
    json: bool,
    /// Add no BOS (nor the EOS a few vocabularies add); by default the
    /// vocabulary's own rule applies.
    #[arg(long)]
    no_bos: bool,
    /// Read special-token text such as <|im_start|> as that token; by
    /// default it is plain text.
    #[arg(long)]
    parse_special: bool,
    /// TEXT is token ids (separated by commas or spaces, brackets allowed):
    /// print their text, special tokens written out.
    #[arg(long, conflicts_with_all = ["json", "no_bos", "parse_special"])]
    detokenize: bool,
    /// The text; `-` reads it from stdin.
    text: String,
}

/// Which model to run and how to hold it.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face model directory (config.json, *.safetensors,
    /// tokenizer.json; GLM-4 in the transformers or the original ChatGLM
    /// layout), a GGUF file (Llama family, Mixtral, Qwen2, Qwen3, Qwen3-MoE,
    /// Phi-3 (LongRoPE too), Gemma 2, Gemma 3, GLM-4 or GLM-4-0414, as llama.cpp's
    /// tools write them: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
    /// K-quants Q2_K to Q6_K and the i-quants IQ1_S to IQ4_XS; the
    /// tokenizer and chat template from its metadata),
    /// a hub id such as `Qwen/Qwen2.5-0.5B-Instruct`
    /// (downloaded into the Hugging Face cache, HF_HOME), or `tiny` (the toy
    /// model shipped in models/longwriter-tiny, for offline tries).
    #[arg(long, short = 'm', env = "LONGWRITER_MODEL")]
    pub model: String,
    /// Fall back to the shipped tiny model when the hub cannot be reached.
    #[arg(skip)]
    pub fallback_to_tiny: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// How the local engine holds and runs a model (every command that runs
/// one takes these).
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Dtype to hold the weights in; activations are computed in f32.
    /// Default: the checkpoint's own (f32, f16 or bf16).
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// Worker threads (default: the number of physical cores). Quantized
    /// products run the CPU's best kernels (AVX2, AVX-VNNI, AVX-512 VNNI on
    /// 256-bit registers, or on 512-bit ones where that pays: Intel, Zen 5;
    /// `bench` prints which); LONGWRITER_KERNELS=avx2, avx-vnni,
    /// avx512-vnni or avx512-zmm holds them to that set.
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Prompt tokens computed per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Quantize a safetensors checkpoint's matrices as it loads: q8_0
    /// (near-lossless, half of f16's bytes), q4_k (a quarter), or q6_k,
    /// q5_k, q3_k, q2_k, q5_1, q5_0, q4_1, q4_0, so bf16 or f32 checkpoints
    /// decode at quantized speed; rows that are not whole 256-blocks take
    /// llama-quantize's fallback type. GGUF files keep their types.
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<lw_model::QType>,
    /// How chat messages become a prompt: `auto` (the model's own template;
    /// GLM-4's format for GLM checkpoints without one), `template` (the
    /// model's own, required), `glm4` (`[gMASK]<sop><|user|>\n…<|assistant|>`)
    /// or `inst` (Llama-2 style `[INST]…[/INST]`, the format
    /// LongWriter-llama3.1-8b was trained with).
    #[arg(long, default_value = "auto", value_parser = parse_chat_format)]
    pub chat_format: lw_engine::ChatFormat,
    /// Speculative decoding with this small model (same tokenizer): it
    /// drafts tokens greedily and the main model checks them in one pass.
    /// Greedy output is identical to plain decoding; sampled output has the
    /// same distribution. Every command that generates takes it: `serve`,
    /// multi-worker `write`, `eval run` and `data build` draft per
    /// sequence inside the batch (a server request opts out with
    /// `"speculate": false`).
    #[arg(long, value_name = "MODEL", conflicts_with = "prompt_lookup")]
    pub draft_model: Option<String>,
    /// Speculative decoding by prompt lookup: the continuation of the latest
    /// earlier occurrence of the last few tokens is the guess (fast when the
    /// text quotes its prompt or repeats itself).
    #[arg(long)]
    pub prompt_lookup: bool,
    /// Most tokens drafted per step (--draft-model, --prompt-lookup).
    #[arg(long, default_value_t = 5)]
    pub draft_max: usize,
    /// Format of the KV cache: f32 (exact), f16 (half the memory, as
    /// llama.cpp keeps it) or q8_0 (llama.cpp's 8.5-bit blocks: 27% of
    /// f32's memory, for contexts that do not fit otherwise; head sizes
    /// must be multiples of 32). Its size is printed before a run starts.
    #[arg(long, default_value = "f32", value_parser = parse_kv_cache)]
    pub kv_cache: lw_model::KvDtype,
    /// The thinking switch of reasoning models' chat templates (Qwen3 and
    /// others that read `enable_thinking`): `off` asks for the answer
    /// without thinking first, `on` for thinking; default: the template's
    /// own. Thinking (`<think>…</think>`) never enters a written document
    /// (`write --keep-thinking` keeps it beside the run).
    #[arg(long, value_enum)]
    pub thinking: Option<Switch>,
    /// The most tokens (prompt and answer) a sequence may hold, below the
    /// model's own context (llama.cpp's -c): it bounds the KV cache's
    /// memory. `write` shows a piece that outgrows it its text so far from
    /// the latest paragraph that fits.
    #[arg(long, value_name = "TOKENS")]
    pub ctx_size: Option<usize>,
    /// A LoRA adapter directory (PEFT layout: adapter_config.json and
    /// adapter_model.safetensors, as `peft` and `train --lora` write them),
    /// merged into the weights as they load: scale · B·A added to each
    /// matrix it names (quantized matrices are dequantized, changed and
    /// quantized again in their own type, Q8_0 for the i-quants). Decoding
    /// runs as fast as the base model.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

fn parse_kv_cache(s: &str) -> Result<lw_model::KvDtype, String> {
    lw_model::KvDtype::parse(s)
        .ok_or_else(|| format!("unknown KV cache format \"{s}\" (use f32, f16 or q8_0)"))
}

fn parse_chat_format(s: &str) -> Result<lw_engine::ChatFormat, String> {
    lw_engine::ChatFormat::parse(s)
        .ok_or_else(|| format!("unknown chat format \"{s}\" (use auto, template, glm4 or inst)"))
}

fn parse_quantize(s: &str) -> Result<lw_model::QType, String> {
    match lw_model::QType::parse(s) {
        Some(q) if q.is_quantized() && q.encodable() => Ok(q),
        _ => Err(format!(
            "unknown quantization \"{s}\" (use q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, q5_1, q5_0, q4_1 or q4_0)"
        )),
    }
}

fn convert(a: &ConvertArgs) -> anyhow::Result<()> {
    let target = lw_engine::gguf::Target::parse(&a.qtype).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown --type \"{}\" (use q4_k_m, q5_k_m, q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, q5_1, q5_0, q4_1, q4_0, f16, bf16 or f32)",
            a.qtype
        )
    })?;
    let dir = lw_engine::resolve_model(&a.model)?;
    if lw_engine::source::is_gguf(&dir) {
        anyhow::bail!("{} is already a GGUF file", dir.display());
    }
    let started = std::time::Instant::now();
    let bar = progress::bar(0, "tensors");
    let report = lw_engine::gguf::convert(&dir, &a.out, target, |i, n, name| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    for (name, q) in &report.fallbacks {
        eprintln!(
            "note: {name}: rows are not whole {} blocks, written as {}",
            target.name(),
            q.name()
        );
    }
    eprintln!(
        "wrote {} ({}, {} tensors, {:.1} MB) in {:.1}s",
        report.path.display(),
        target.name(),
        report.tensors,
        report.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

/// Sampling settings shared by `generate` and `chat`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: the model's
    /// generation_config.json, else 0.7.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep tokens up to this cumulative probability (1 = off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the top token's probability (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the prompt or the output (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Random seed; the same seed gives the same text. Default: random (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Subtract this from the logit of every token already generated, once
    /// (OpenAI's presence penalty; 0 = off, positive values push towards
    /// new words).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Subtract this from a generated token's logit once per time it was
    /// generated (OpenAI's frequency penalty; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Add BIAS to token ID's logit, as ID=BIAS (repeatable; -100 bans a
    /// token, as with OpenAI's logit_bias).
    #[arg(long = "logit-bias", value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// No end of the answer before this many tokens (end-of-turn tokens
    /// are masked until then).
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// DRY ("don't repeat yourself") strength: a token that would extend
    /// a repeat of the text loses MULT · base^(length − allowed length)
    /// from its logit (0 = off; 0.8 is a common choice).
    #[arg(long, default_value_t = 0.0)]
    pub dry_multiplier: f32,
    /// DRY's growth per repeated token beyond the allowed length.
    #[arg(long, default_value_t = 1.75)]
    pub dry_base: f32,
    /// DRY: repeats up to this many tokens go unpenalised.
    #[arg(long, default_value_t = 2)]
    pub dry_allowed_length: usize,
    /// DRY: how many of the last tokens are searched (0 = all).
    #[arg(long, default_value_t = 0)]
    pub dry_penalty_last_n: usize,
    /// DRY: a repeat never runs across a token containing this text
    /// (repeatable; default: new line, ":", '"', "*").
    #[arg(long = "dry-sequence-breaker")]
    pub dry_sequence_breakers: Vec<String>,
    /// Structured decoding: the output follows this grammar file, in
    /// llama.cpp's GBNF (`root ::= ...`), or llguidance's Lark syntax when
    /// the file name ends in `.lark`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_schema", "regex", "json"])]
    pub grammar: Option<std::path::PathBuf>,
    /// Structured decoding: the output is JSON that this JSON Schema
    /// accepts (a file, or the schema's JSON text itself).
    #[arg(long, value_name = "FILE|JSON", conflicts_with_all = ["regex", "json"])]
    pub json_schema: Option<String>,
    /// Structured decoding: the whole output matches this regular
    /// expression.
    #[arg(long, value_name = "REGEX", conflicts_with = "json")]
    pub regex: Option<String>,
    /// Structured decoding: the output is one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl SamplingArgs {
    /// The structured-decoding constraint the flags ask for (grammar and
    /// schema files read).
    pub fn constraint(&self) -> anyhow::Result<Option<lw_core::Constraint>> {
        use lw_core::Constraint;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        Ok(if let Some(path) = &self.grammar {
            let text = read(path)?;
            Some(if path.extension().is_some_and(|e| e == "lark") {
                Constraint::Lark(text)
            } else {
                Constraint::Gbnf(text)
            })
        } else if let Some(schema) = &self.json_schema {
            let text = if schema.trim_start().starts_with('{') {
                schema.clone()
            } else {
                read(std::path::Path::new(schema))?
            };
            Some(Constraint::JsonSchema(text))
        } else if let Some(rx) = &self.regex {
            Some(Constraint::Regex(rx.clone()))
        } else {
            self.json.then_some(Constraint::JsonObject)
        })
    }
}

fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("\"{s}\": write a token id and a bias as ID=BIAS, e.g. 13=-100"))?;
    let id = id
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("\"{id}\" is not a token id"))?;
    let bias = bias
        .trim()
        .parse::<f32>()
        .ok()
        .filter(|b| b.is_finite())
        .ok_or_else(|| format!("\"{bias}\" is not a finite number"))?;
    Ok((id, bias))
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Apply the model's chat template (the prompt becomes a user message).
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The prompt; `-` reads it from stdin.
    prompt: String,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System message for the conversation.
    #[arg(long)]
    system: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Write(a) => write::write(&a),
        Command::Plan(a) => write::plan(&a),
        Command::Generate(a) => generate(a),
        Command::Chat(a) => run::chat(&a.model, &a.sampling, a.system.as_deref()),
        Command::Bench(a) => bench::run(&a),
        Command::Count(a) => count(&a),
        Command::Tokenize(a) => tokenize(&a),
        Command::Serve(a) => serve(&a),
        Command::Eval(c) => eval::run(&c),
        Command::Study(c) => study::run(&c),
        Command::Tokenizer(TokenizerCommand::Train(a)) => tokenizer_train(&a),
        Command::Data(DataCommand::Build(a)) => data::build(&a),
        Command::Data(DataCommand::Export(a)) => data::export(&a),
        Command::Data(DataCommand::Stats(a)) => data::stats(&a),
        Command::Data(DataCommand::Select(a)) => data::select(&a),
        Command::Data(DataCommand::Tokenize(a)) => data_tokenize(&a),
        Command::Data(DataCommand::Synth(a)) => synth::data_synth(
            &a.files,
            &a.out,
            a.max_documents,
            &a.paragraphs,
            &a.words,
            a.seed,
        ),
        Command::Train(train::TrainCommand::Pretrain(a)) => train::pretrain(&a),
        Command::Train(train::TrainCommand::Sft(a)) => train::sft(&a),
        Command::Lora(train::LoraCommand::Merge(a)) => train::merge(&a),
        Command::Convert(a) => convert(&a),
        Command::Score(a) => score(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once: a cause whose text its parent
/// already carries (the library errors name their source inline) is not
/// repeated after it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let prompt = if a.prompt == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        a.prompt
    };
    if prompt.is_empty() {
        return Err(lw_engine::EngineError::EmptyPrompt.into());
    }
    let mut engine = run::load_engine(&a.model)?;
    let ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = a.system {
            messages.push(lw_core::Message::system(s));
        }
        messages.push(lw_core::Message::user(prompt));
        engine.encode_chat(&messages)?
    } else {
        engine.encode_raw(&prompt)?
    };
    let params = run::generation_params(&engine, &a.sampling)?;
    let out = run::stream_to_stdout(&mut engine, &ids, &params)?;
    run::print_stats(&out, params.sampling.seed);
    Ok(())
}

fn count(a: &CountArgs) -> anyhow::Result<()> {
    let text = match &a.file {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        _ => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading stdin")?;
            s
        }
    };
    let counter: lw_core::Counter = a.counter.parse().map_err(anyhow::Error::msg)?;
    println!("{}", counter.count(&text));
    Ok(())
}

fn tokenize(a: &TokenizeArgs) -> anyhow::Result<()> {
    let text = if a.text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        a.text.clone()
    };
    let tok = lw_engine::load_tokenizer(&lw_engine::resolve_model(&a.model)?)?;
    if a.detokenize {
        let ids = text
            .split(|c: char| c == ',' || c == '[' || c == ']' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .with_context(|| format!("\"{s}\" is not a token id"))
            })
            .collect::<anyhow::Result<Vec<u32>>>()?;
        println!("{}", tok.decode_with(&ids, true)?);
        return Ok(());
    }
    let ids = tok.encode_with(&text, !a.no_bos, a.parse_special)?;
    if a.json {
        let items = ids
            .iter()
            .map(|&id| Ok(serde_json::json!({"id": id, "piece": tok.piece(id)?})))
            .collect::<anyhow::Result<Vec<_>>>()?;
        println!("{}", serde_json::Value::Array(items));
    } else {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

fn serve(a: &ServeArgs) -> anyhow::Result<()> {
    let mut api_keys: Vec<String> = a.api_key.iter().cloned().collect();
    if let Some(path) = &a.keys_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the keys file {}", path.display()))?;
        let keys: Vec<String> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if keys.is_empty() {
            anyhow::bail!("{}: the keys file holds no keys", path.display());
        }
        api_keys.extend(keys);
    }
    let data_dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
    let engine = run::load_engine(&a.model)?;
    let opts = lw_server::ServeOptions {
        model_name: a.served_model_name.clone().unwrap_or_else(|| {
            let given = std::path::Path::new(&a.model.model);
            match given.file_name() {
                Some(n) if given.exists() => n.to_string_lossy().into_owned(),
                _ => a.model.model.clone(),
            }
        }),
        model_aliases: vec![a.model.model.clone(), "default".into()],
        api_keys,
        max_new_tokens: a.max_new_tokens,
        max_prompt_tokens: a.max_prompt_tokens,
        max_body_bytes: a.max_body_bytes,
        max_jobs_per_key: a.max_jobs_per_key.max(1),
        batch: lw_engine::BatchOptions {
            max_batch: a.max_batch.max(1),
            max_queue: a.max_queue,
            idle_caches: a.max_batch.max(1),
        },
        data_dir: data_dir.clone(),
        conn: lw_server::ConnLimits {
            header_timeout: std::time::Duration::try_from_secs_f64(a.header_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--header-timeout {}: give a positive number of seconds",
                        a.header_timeout
                    )
                })?,
            max_connections: a.max_connections.max(1),
            ..Default::default()
        },
    };
    lw_server::run(engine, opts, &a.host, a.port, |addr, resumed| {
        eprintln!("jobs: {}", data_dir.join("jobs.sqlite").display());
        if resumed > 0 {
            eprintln!("resuming {resumed} unfinished job(s)");
        }
        eprintln!("listening on http://{addr} (OpenAI-compatible API at http://{addr}/v1, page at http://{addr}/)");
    })
    .map_err(|e| anyhow::anyhow!("serving on {}:{}: {e}", a.host, a.port))
}

fn tokenizer_train(a: &TokenizerTrainArgs) -> anyhow::Result<()> {
    let mut spec = lw_train::TokenizerSpec {
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency,
        max_length: a.max_length,
        ..Default::default()
    };
    if !a.special.is_empty() {
        spec.special_tokens = a.special.clone();
    }
    let started = std::time::Instant::now();
    let vocab = lw_train::train_tokenizer(&a.files, &spec, &a.out)?;
    eprintln!(
        "trained a byte-level BPE of {vocab} entries on {} file(s) in {:.1}s: {}",
        a.files.len(),
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    if vocab < a.vocab_size {
        eprintln!(
            "note: the text supports only {vocab} entries of the {} asked (more text, or a lower --min-frequency, gives more)",
            a.vocab_size
        );
    }
    Ok(())
}

fn data_tokenize(a: &DataTokenizeArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.val_fraction) {
        anyhow::bail!("--val-fraction must be in [0, 1), not {}", a.val_fraction);
    }
    let started = std::time::Instant::now();
    let s = lw_train::tokenize_corpus(
        &a.tokenizer,
        &a.files,
        &a.out,
        a.val_fraction,
        a.shard_tokens,
    )?;
    eprintln!(
        "{} documents: {} training and {} validation tokens in {} shard(s), {:.1}s: {}",
        s.documents,
        s.train_tokens,
        s.val_tokens,
        s.shards.len(),
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// `$XDG_DATA_HOME/longwriter`, else `~/.local/share/longwriter`, else `./longwriter-data`.
fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("longwriter");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/longwriter"),
        None => PathBuf::from("longwriter-data"),
    }
}
