#!/usr/bin/env python3
"""Reference dequantizations of the grid i-quants, for the bit-exact test in
crates/lw-model/src/igrid.rs.

Makes a few blocks of each type (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
IQ1_S, IQ1_M) from a fixed seed: one with every other byte zero, one with
every other byte 0xFF (the largest grid indices), and random ones; each with
a small finite f16 scale of either sign. Dequantizes them with the `gguf`
Python package's numpy reference (`gguf.quants.dequantize`) and writes the
blocks and the f32 bits of every value to
crates/lw-model/tests/fixtures/igrid.json. The fixture is committed, so CI
needs no Python for it.

    python3 scripts/igrid_reference.py [LLAMA_CPP_SRC]

LLAMA_CPP_SRC is the `vendor/llama.cpp` directory of the llama-cpp-python
source package (default: $LONGWRITER_LLAMA_CPP_SRC, else the one
scripts/llama_cpp_setup.sh unpacks). Needs numpy and PyYAML (gguf-py imports
both).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = Path.home() / ".cache/longwriter/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
OUT = ROOT / "crates/lw-model/tests/fixtures/igrid.json"

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
RANDOM_BLOCKS = 4


def with_scale(name, block, d):
    """`block` with its f16 scale set to `d`."""
    bits = int(np.array([d], dtype=np.float16).view(np.uint16)[0])
    if name == "IQ1_M":
        # IQ1_M keeps d's four nibbles in the top nibbles of its last four
        # u16 (the 3-bit sub-block scales sit below them).
        for i in range(4):
            at = len(block) - 8 + 2 * i
            u = int(block[at]) | int(block[at + 1]) << 8
            u = (u & 0x0FFF) | ((bits >> (4 * i)) & 0xF) << 12
            block[at], block[at + 1] = u & 0xFF, u >> 8
    else:
        block[0], block[1] = bits & 0xFF, bits >> 8
    return block


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LONGWRITER_LLAMA_CPP_SRC", DEFAULT_SRC))
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    rng = np.random.default_rng(20240726)
    cases = []
    for name in TYPES:
        qtype = GGMLQuantizationType[name]
        _, type_size = GGML_QUANT_SIZES[qtype]
        blocks = [np.zeros(type_size, np.uint8), np.full(type_size, 0xFF, np.uint8)]
        blocks += [rng.integers(0, 256, type_size, dtype=np.uint8) for _ in range(RANDOM_BLOCKS)]
        for block in blocks:
            d = rng.uniform(1e-3, 5e-2) * rng.choice([-1.0, 1.0])
            with_scale(name, block, d)
        data = np.stack(blocks)
        values = quants.dequantize(data, qtype).astype(np.float32, copy=False)
        assert values.dtype == np.float32 and np.isfinite(values).all()
        cases.append(
            {
                "type": name,
                "blocks": data.tobytes().hex(),
                "bits": [int(v) for v in values.reshape(-1).view(np.uint32)],
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fixture = {
        "about": "gguf.quants.dequantize of these blocks (f32 bits); made by scripts/igrid_reference.py",
        "cases": cases,
    }
    OUT.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
