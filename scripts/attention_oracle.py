#!/usr/bin/env python3
"""Reference outputs and gradients for `lw-train`'s tiled attention,
computed with PyTorch's eager attention on an explicit block-diagonal causal
mask (the [len x len] matrices the tiled kernel never builds).

Two packed rows of 150 positions, grouped-query heads (4 query heads over 2
key/value heads), head size 24 (not a multiple of the kernel's 16-wide
sums): row 0 holds sequences of 50, 61 and 39 tokens; row 1 one of 131 and
19 padding positions (their own segment, as the packer writes them). It
writes `case.safetensors` (q, k, v, the upstream gradient `dout`, the
output `out`, gradients `dq`, `dk`, `dv`, all f32) and `case.json` (shapes,
segments, scale). crates/lw-train/tests/attention.rs must agree within
1e-5 (output) and 1e-4 (gradients), relative to each tensor's largest value.

    python scripts/attention_oracle.py crates/lw-train/tests/fixtures/attention
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

ROWS, HEADS, KV_HEADS, LEN, HEAD_DIM = 2, 4, 2, 150, 24


def main(out):
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    segments = [[], []]
    # Row 1's last run is padding (the packer's id for it).
    segments[0] = [0] * 50 + [1] * 61 + [2] * 39
    segments[1] = [0] * 131 + [2**32 - 1] * 19
    seg = torch.tensor(segments, dtype=torch.int64)
    causal = torch.ones(LEN, LEN).tril().bool()
    same = seg[:, :, None] == seg[:, None, :]
    allowed = (causal[None] & same)[:, None]  # [rows, 1, len, len]

    q = torch.randn(ROWS, HEADS, LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(ROWS, KV_HEADS, LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(ROWS, KV_HEADS, LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout = torch.randn(ROWS, HEADS, LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    # Scores of a trained model are larger than those of unit normals;
    # scale the queries so the softmax is peaked in places.
    q = q * 1.7
    for t in (q, k, v):
        t.requires_grad_(True)
    scale = 1.0 / HEAD_DIM**0.5
    rep = HEADS // KV_HEADS
    kk = k.repeat_interleave(rep, dim=1)
    vv = v.repeat_interleave(rep, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out_t = torch.softmax(scores, dim=-1) @ vv
    out_t.backward(dout)

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    save_file(
        {
            "q": f32(q),
            "k": f32(k),
            "v": f32(v),
            "dout": f32(dout),
            "out": f32(out_t),
            "dq": f32(q.grad),
            "dk": f32(k.grad),
            "dv": f32(v.grad),
        },
        os.path.join(out, "case.safetensors"),
    )
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(
            {
                "rows": ROWS,
                "heads": HEADS,
                "kv_heads": KV_HEADS,
                "len": LEN,
                "head_dim": HEAD_DIM,
                "scale": scale,
                "segments": [x for row in segments for x in row],
            },
            f,
        )
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
