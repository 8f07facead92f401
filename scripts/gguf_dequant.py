#!/usr/bin/env python3
"""The `gguf` package's numpy dequantization of one GGUF tensor, the
reference of the real-model tests: writes the tensor's values as
little-endian f32 to OUT.

    gguf_dequant.py FILE.gguf TENSOR OUT

gguf-py is imported from llama.cpp's tree ($LONGWRITER_LLAMA_CPP_SRC, the
`vendor/llama.cpp` directory of the llama-cpp-python source package); it
needs numpy (and PyYAML, which it imports).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.environ["LONGWRITER_LLAMA_CPP_SRC"], "gguf-py"))
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

path, name, out = sys.argv[1:4]
for t in GGUFReader(path).tensors:
    if t.name == name:
        values = dequantize(t.data, t.tensor_type).astype("<f4", copy=False)
        values.tofile(out)
        break
else:
    sys.exit(f"{path}: no tensor {name}")
