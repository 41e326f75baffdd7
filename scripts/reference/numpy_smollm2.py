#!/usr/bin/env python3
"""An independent f32 reference forward of SmolLM2-135M-Instruct written in numpy, reading the GGUF
with the `gguf` package (llama.cpp's own Python reader and dequantizer). Unlike llama.cpp it keeps
activations in f32, which is what retort does when scoring, so logits must agree closely.

It applies RoPE in llama.cpp's interleaved layout directly on the GGUF's permuted Q/K weights, so
it does not share retort's un-permutation step: agreement also checks that step.

    pip install gguf==0.19.0 numpy
    scripts/fetch-assets
    python3 scripts/reference/numpy_smollm2.py > crates/retort-model/tests/fixtures/smollm2_numpy.json
"""
import json
import sys

import numpy as np
import gguf
from gguf.quants import dequantize

GGUF = "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE = "crates/retort-model/tests/fixtures/smollm2_llamacpp.json"


def main():
    r = gguf.GGUFReader(GGUF)
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a

    def f(key):
        return r.fields[key].parts[r.fields[key].data[0]][0]

    C = int(f("llama.embedding_length")); L = int(f("llama.block_count"))
    H = int(f("llama.attention.head_count")); KVH = int(f("llama.attention.head_count_kv"))
    eps = float(f("llama.attention.layer_norm_rms_epsilon")); theta = float(f("llama.rope.freq_base"))
    D = C // H

    ids = json.load(open(FIXTURE))["prompt_ids"]
    T = len(ids)
    x = W["token_embd.weight"][ids]  # (T, C)

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.arange(T)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rope_interleaved(q, n):  # q (T, n*D), pairs (2i, 2i+1)
        q = q.reshape(T, n, D // 2, 2)
        a, b = q[..., 0], q[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, n, D)

    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for i in range(L):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope_interleaved(h @ W[p + "attn_q.weight"].T, H)
        k = rope_interleaved(h @ W[p + "attn_k.weight"].T, KVH)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, KVH, D)
        k = np.repeat(k, H // KVH, axis=1); v = np.repeat(v, H // KVH, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        att = np.exp(att - att.max(-1, keepdims=True)); att /= att.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", att, v).reshape(T, C)
        x = x + y @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    head = W.get("output.weight", W["token_embd.weight"])
    logits = x[-1] @ head.T
    top = np.argsort(-logits)[:5]
    json.dump({
        "_header": {"script": "scripts/reference/numpy_smollm2.py", "numpy": np.__version__,
                    "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "model": GGUF},
        "prompt_ids": ids,
        "top5_ids": [int(i) for i in top],
        "top5_logits": [float(logits[i]) for i in top],
    }, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
