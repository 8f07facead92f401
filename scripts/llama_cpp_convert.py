#!/usr/bin/env python3
"""The test models converted to GGUF by llama.cpp's own converter.

`convert_hf_to_gguf.py` (from the llama-cpp-python source package's
`vendor/llama.cpp`) writes each fixture model as an F32 GGUF file next to
it (`tests/fixtures/models/NAME.llama-cpp.gguf`). The Rust tests load those
files and must give transformers' logits, so the engine reads what llama.cpp
writes, not only what `longwriter convert` writes.

The fixtures' tokenizers are trained on a tiny corpus, so the converter's
check of known pre-tokenizers (a hash of some encoded text) cannot
recognise them: that one step is given the name of the family's
pre-tokenizer instead of failing. Everything else is the converter as
shipped.

Run it with the venv of `scripts/requirements-ref.txt` (torch,
transformers):

    python scripts/llama_cpp_convert.py [LLAMA_CPP_DIR] [--only NAME,NAME]
"""

import glob
import os
import runpy
import sys

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models"))

# Fixture model -> the name of its pre-tokenizer in llama.cpp's terms: the
# fixtures' tokenizers split text with the byte-level (GPT-2) expression.
MODELS = {
    "llama3-untied": "gpt-2",
    "qwen2": "gpt-2",
    "qwen3": "gpt-2",
    "qwen3-moe": "gpt-2",
    "mixtral": "gpt-2",
    "glm4-0414": "gpt-2",
    "gemma3": "gpt-2",
    # Gemma 2's converter reads only a sentencepiece tokenizer.model: the
    # byte-level fixture's vocabulary goes through the GPT-2 path instead
    # (the one Gemma 3's converter takes without tokenizer.model); the
    # weights and metadata are the converter's own.
    "gemma2": "gpt-2",
    # Phi-3's converter, likewise, reads only tokenizer.model.
    "phi3": "gpt-2",
    "phi3-longrope": "gpt-2",
}


def llama_cpp_dir(arg):
    if arg:
        return arg
    found = sorted(
        glob.glob(
            os.path.expanduser("~/.cache/longwriter/llama-cpp/llama_cpp_python-*/vendor/llama.cpp")
        )
    )
    if not found:
        sys.exit("no llama.cpp source: run scripts/llama_cpp_tools.sh first, or pass its directory")
    return found[-1]


def convert(src, name, pre):
    model = os.path.join(FIXTURES, name)
    out = os.path.join(FIXTURES, f"{name}.llama-cpp.gguf")
    sys.path.insert(0, src)
    sys.path.insert(1, os.path.join(src, "gguf-py"))
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    # Converters that read only a sentencepiece tokenizer.model take the
    # fixture's byte-level vocabulary through the GPT-2 path.
    def byte_level_vocab(self):
        self._set_vocab_gpt2()
        self.gguf_writer.add_add_space_prefix(False)

    if name == "gemma2":
        from conversion import gemma

        gemma.Gemma2Model.set_vocab = byte_level_vocab
    if name.startswith("phi3"):
        from conversion import phi

        phi.Phi3MiniModel.set_vocab = byte_level_vocab
    sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
    runpy.run_path(os.path.join(src, "convert_hf_to_gguf.py"), run_name="__main__")
    print(f"{name}: {out} ({os.path.getsize(out)} bytes)")


def main(args):
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = set(args[i + 1].split(","))
        del args[i : i + 2]
    src = llama_cpp_dir(args[0] if args else None)
    for name, pre in MODELS.items():
        if only is None or name in only:
            convert(src, name, pre)


if __name__ == "__main__":
    main(sys.argv[1:])
