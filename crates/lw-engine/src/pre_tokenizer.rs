//! The pre-tokenizers of BPE vocabularies, by the names llama.cpp gives them
//! in a GGUF file's `tokenizer.ggml.pre`: one table of name → split
//! regexes and the few flags that go with a name. Nothing else here: the
//! vocabulary that uses a row is built in `vocab`.
//!
//! The regexes are the ones the models' `tokenizer.json` files split with,
//! which is what llama.cpp's own test files were made from. Where llama.cpp
//! had to rewrite one for its regex engine (`(?i:…)` spelled out as
//! `[sS]`, `\p{Lu}` approximated with lookaheads) the original is kept,
//! since `fancy-regex` compiles it. Two rows stand for splitters llama.cpp
//! writes by hand: AFMoE's digit groups and Gemma 4's newline runs.

/// How the words of a BPE vocabulary are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// GPT-2's map of bytes to printable characters (most vocabularies).
    Bytes,
    /// UTF-8 with `▁` for a space and `<0xXX>` tokens for bytes the
    /// vocabulary lacks (Gemma 4, Sarvam).
    Metaspace,
    /// UTF-8 as it is.
    Plain,
}

/// Whether encoding with special tokens starts with BOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bos {
    /// Only when `tokenizer.ggml.add_bos_token` is true.
    IfAsked,
    /// Unless `tokenizer.ggml.add_bos_token` is false.
    UnlessRefused,
    /// Always, whatever the file says (Gemma 4).
    Always,
}

/// One row of the table.
#[derive(Debug)]
pub struct PreTokenizer {
    /// The `tokenizer.ggml.pre` names of this row.
    pub names: &'static [&'static str],
    /// Regexes applied in turn: each one splits every piece the previous
    /// left, keeping both its matches and the text between them.
    pub splits: &'static [&'static str],
    pub spelling: Spelling,
    /// A word that is a token as a whole is that token, whatever the merges
    /// would make of it.
    pub ignore_merges: bool,
    /// A run of newlines that is a token is that token (Gemma 4).
    pub whole_newline_runs: bool,
    pub bos: Bos,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const JAIS2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";
const DEEPSEEK_LLM_PUNCT: &str = r"\s?[!-/:-~！-／：-～‘-‟　-。]+";
const CJK_HANGUL: &str = r"[一-龥ࠀ-一가-퟿]+";
const CJK_KANA: &str = r"[一-龥぀-ゟ゠-ヿ]+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const SPARK2_5: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##;
const YOUTU_CJK: &str = r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+";
const YOUTU: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's form: GPT-4o's with combining marks counted as letters.
const GRANITE_EMB_MULTI: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const KIMI_K2: &str = r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const UFAKZEKA: &str =
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Digit runs in groups of three from the right (llama.cpp splits these by hand).
const DIGITS_BY_THREE: &str = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))";
const AFMOE_CJK: &str = r"[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+";
const EXAONE_MOE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";
const MINICPM5: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const NEWLINE_RUNS: &str = r"[^\n]+|[\n]+";

/// A row with the common flags: byte-level words, merges applied, BOS only
/// when the file asks for it.
const fn row(names: &'static [&'static str], splits: &'static [&'static str]) -> PreTokenizer {
    PreTokenizer {
        names,
        splits,
        spelling: Spelling::Bytes,
        ignore_merges: false,
        whole_newline_runs: false,
        bos: Bos::IfAsked,
    }
}

/// Every pre-tokenizer, in llama.cpp's order.
#[rustfmt::skip]
pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    row(&["default"], &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
    PreTokenizer {
        ignore_merges: true,
        bos: Bos::UnlessRefused,
        ..row(&["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                "lfm2", "jina-v5-nano"], &[LLAMA3])
    },
    PreTokenizer { ignore_merges: true, ..row(&["minicpm5"], &[r"\p{N}{1,3}", MINICPM5]) },
    row(&["dbrx", "smaug-bpe"], &[LLAMA3]),
    row(&["jais-2"], &[JAIS2]),
    row(&["deepseek-llm"],
        &[r"[\r\n]", DEEPSEEK_LLM_LETTERS, DEEPSEEK_LLM_PUNCT, r"\s+$", CJK_HANGUL, r"\p{N}+"]),
    row(&["deepseek-coder"], &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}"]),
    row(&["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"], &[r"\p{N}{1,3}", CJK_KANA, DEEPSEEK3]),
    row(&["spark2_5"], &[r"\p{N}{1,3}", CJK_KANA, SPARK2_5, r"\p{N}"]),
    PreTokenizer { ignore_merges: true, ..row(&["youtu"], &[YOUTU_CJK, YOUTU]) },
    row(&["falcon"], &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"]),
    row(&["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
          "mellum2"], &[r"\p{N}", GPT2]),
    row(&["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
          "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
          "trillion", "granite-docling", "exaone4"], &[GPT2]),
    row(&["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
          "solar-open", "grok-2"], &[QWEN2]),
    row(&["qwen35"], &[QWEN35]),
    row(&["poro-chat", "bloom", "gpt3-finnish"], &[PORO]),
    row(&["chatglm-bpe"], &[LLAMA3]),
    PreTokenizer { ignore_merges: true, ..row(&["glm4", "glm5"], &[LLAMA3]) },
    row(&["viking"], &[PORO, r"\p{N}"]),
    PreTokenizer { ignore_merges: true, bos: Bos::UnlessRefused, ..row(&["tekken"], &[TEKKEN]) },
    PreTokenizer {
        bos: Bos::UnlessRefused,
        ..row(&["chameleon"], &[
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            "([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            GPT2,
        ])
    },
    row(&["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], &[GPT4O]),
    PreTokenizer { ignore_merges: true, ..row(&["granite-embed-multi-97m"], &[GRANITE_EMB_MULTI]) },
    row(&["tiny_aya", "cohere2moe"], &[r"\d{1,3}(?=(?:\d{3})*\b)", GPT4O]),
    row(&["kimi-k2"], &[KIMI_K2]),
    row(&["superbpe"], &[r"\p{N}+", r"(?=(\d{3})+(?!\d))"]),
    row(&["bailingmoe", "bailingmoe2", "llada-moe"], &[BAILINGMOE]),
    row(&["seed-coder"], &[SEED_CODER]),
    row(&["ufakzeka"], &[UFAKZEKA]),
    row(&["afmoe"], &[DIGITS_BY_THREE, AFMOE_CJK, DEEPSEEK3]),
    row(&["laguna"], &[NEWLINE_RUNS, QWEN2]),
    row(&["exaone-moe"], &[EXAONE_MOE]),
    PreTokenizer {
        spelling: Spelling::Metaspace,
        whole_newline_runs: true,
        bos: Bos::Always,
        ..row(&["gemma4", "granite-embed-multi-311m"], &[NEWLINE_RUNS])
    },
    PreTokenizer { spelling: Spelling::Metaspace, ..row(&["sarvam-moe"], &[NEWLINE_RUNS]) },
    PreTokenizer { spelling: Spelling::Plain, ..row(&["whitespace"], &[r"\S+"]) },
];

/// The row named `name`.
pub fn find(name: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))
}

/// Every name, in table order (for error messages).
pub fn names() -> Vec<&'static str> {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|p| p.names.iter().copied())
        .collect()
}

/// The name of the first row that splits with `pattern` alone, spelled in
/// bytes (to name a `tokenizer.json` split when writing GGUF).
pub fn name_of_split(pattern: &str) -> Option<&'static str> {
    PRE_TOKENIZERS
        .iter()
        .find(|p| p.splits == [pattern] && p.spelling == Spelling::Bytes)
        .map(|p| p.names[0])
}
