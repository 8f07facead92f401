//! The GGUF tensor types: one table of their ids, names and block shapes.
//! Owns nothing else (the products live in `quant`, the kernels in
//! `kernels`).

/// The tensor types this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ3XXS,
    IQ3S,
    IQ1S,
    IQ1M,
    IQ4NL,
    IQ4XS,
}

/// One row of the table: ggml's id, its name, elements and bytes per block.
struct Shape {
    qtype: QType,
    id: u32,
    name: &'static str,
    elems: usize,
    bytes: usize,
}

const fn shape(qtype: QType, id: u32, name: &'static str, elems: usize, bytes: usize) -> Shape {
    Shape {
        qtype,
        id,
        name,
        elems,
        bytes,
    }
}

/// Every type this crate runs, as ggml defines it (`ggml.h`,
/// `ggml-common.h`: the block structs' sizes).
const TABLE: [Shape; 22] = [
    shape(QType::F32, 0, "F32", 1, 4),
    shape(QType::F16, 1, "F16", 1, 2),
    shape(QType::Q4_0, 2, "Q4_0", 32, 18),
    shape(QType::Q4_1, 3, "Q4_1", 32, 20),
    shape(QType::Q5_0, 6, "Q5_0", 32, 22),
    shape(QType::Q5_1, 7, "Q5_1", 32, 24),
    shape(QType::Q8_0, 8, "Q8_0", 32, 34),
    shape(QType::Q2K, 10, "Q2_K", 256, 84),
    shape(QType::Q3K, 11, "Q3_K", 256, 110),
    shape(QType::Q4K, 12, "Q4_K", 256, 144),
    shape(QType::Q5K, 13, "Q5_K", 256, 176),
    shape(QType::Q6K, 14, "Q6_K", 256, 210),
    shape(QType::IQ2XXS, 16, "IQ2_XXS", 256, 66),
    shape(QType::IQ2XS, 17, "IQ2_XS", 256, 74),
    shape(QType::IQ3XXS, 18, "IQ3_XXS", 256, 98),
    shape(QType::IQ1S, 19, "IQ1_S", 256, 50),
    shape(QType::IQ4NL, 20, "IQ4_NL", 32, 18),
    shape(QType::IQ3S, 21, "IQ3_S", 256, 110),
    shape(QType::IQ2S, 22, "IQ2_S", 256, 82),
    shape(QType::IQ4XS, 23, "IQ4_XS", 256, 136),
    shape(QType::IQ1M, 29, "IQ1_M", 256, 56),
    shape(QType::BF16, 30, "BF16", 1, 2),
];

impl QType {
    /// Every type, in ggml's id order.
    pub fn all() -> impl Iterator<Item = QType> {
        TABLE.iter().map(|s| s.qtype)
    }

    /// The names of every type, for error messages.
    pub fn supported() -> String {
        TABLE.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
    }

    fn shape(self) -> &'static Shape {
        TABLE
            .iter()
            .find(|s| s.qtype == self)
            .expect("every QType has a row in TABLE")
    }

    /// `Some(Ok)` for a supported ggml type id, `Some(Err(name))` for a known
    /// one this crate does not run, `None` for an unknown id.
    pub fn from_ggml(id: u32) -> Option<Result<QType, &'static str>> {
        if let Some(s) = TABLE.iter().find(|s| s.id == id) {
            return Some(Ok(s.qtype));
        }
        Some(Err(match id {
            9 => "Q8_1",
            15 => "Q8_K",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            34 | 35 => "a ternary type (TQ1_0/TQ2_0)",
            39 => "MXFP4",
            _ => return None,
        }))
    }

    pub fn ggml_id(self) -> u32 {
        self.shape().id
    }

    pub fn name(self) -> &'static str {
        self.shape().name
    }

    /// Parses a name as users write it: `q4_k`, `Q4_K`, `q4k`, `iq4_xs`, `f16`…
    pub fn parse(s: &str) -> Option<QType> {
        let norm = |n: &str| n.replace('_', "").to_ascii_lowercase();
        let want = norm(s);
        TABLE.iter().find(|t| norm(t.name) == want).map(|t| t.qtype)
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        self.shape().elems
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.shape().bytes
    }

    /// Whether this crate can write the type (`convert`, `--quantize`): the
    /// grid i-quants and the IQ4 types need llama.cpp's importance-weighted
    /// search, so they are read only.
    pub fn encodable(self) -> bool {
        !matches!(
            self,
            QType::IQ2XXS
                | QType::IQ2XS
                | QType::IQ2S
                | QType::IQ3XXS
                | QType::IQ3S
                | QType::IQ1S
                | QType::IQ1M
                | QType::IQ4NL
                | QType::IQ4XS
        )
    }

    /// The type llama.cpp's `llama-quantize` writes instead of this one for
    /// a tensor whose rows of `cols` are not whole blocks: a 32-weight type
    /// of about the same size where the rows are whole 32-blocks, F16
    /// otherwise. (IQ4_NL, the i-quants' fallback, is read only here, so
    /// `convert` never asks for it.)
    pub fn fallback(self, cols: usize) -> QType {
        if cols.is_multiple_of(self.block_elems()) {
            return self;
        }
        let small = match self {
            QType::IQ1S
            | QType::IQ1M
            | QType::IQ2XXS
            | QType::IQ2XS
            | QType::IQ2S
            | QType::IQ3XXS
            | QType::IQ3S
            | QType::IQ4XS => QType::IQ4NL,
            QType::Q2K | QType::Q3K => QType::Q4_0,
            QType::Q4K => QType::Q5_0,
            QType::Q5K => QType::Q5_1,
            QType::Q6K => QType::Q8_0,
            other => other,
        };
        if cols.is_multiple_of(small.block_elems()) {
            small
        } else {
            QType::F16
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of a row of `cols` elements (a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }
}

/// IQ4_NL's and IQ4_XS's sixteen levels (ggml's `kvalues_iq4nl`).
pub(crate) const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for q in QType::all() {
            assert_eq!(QType::parse(q.name()), Some(q), "{}", q.name());
            assert_eq!(QType::from_ggml(q.ggml_id()), Some(Ok(q)));
        }
        assert_eq!(QType::parse("q4_k"), Some(QType::Q4K));
        assert_eq!(QType::parse("iq4xs"), Some(QType::IQ4XS));
        assert_eq!(QType::parse("q4_k_m"), None);
        assert_eq!(QType::from_ggml(15), Some(Err("Q8_K")));
        assert_eq!(QType::from_ggml(1000), None);
        assert!(QType::supported().contains("IQ1_M"));
    }

    #[test]
    fn fallbacks_follow_llama_quantize() {
        // Rows of 576 (SmolLM2's width) are whole 32-blocks, not 256-blocks.
        assert_eq!(QType::Q4K.fallback(576), QType::Q5_0);
        assert_eq!(QType::Q5K.fallback(576), QType::Q5_1);
        assert_eq!(QType::Q6K.fallback(576), QType::Q8_0);
        assert_eq!(QType::Q3K.fallback(576), QType::Q4_0);
        assert_eq!(QType::IQ4XS.fallback(576), QType::IQ4NL);
        assert_eq!(QType::Q4K.fallback(512), QType::Q4K);
        assert_eq!(QType::Q8_0.fallback(40), QType::F16);
        assert_eq!(QType::Q6K.fallback(40), QType::F16);
    }
}
