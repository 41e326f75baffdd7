#!/usr/bin/env python3
"""Reference dequantization of every GGUF quant type a file uses, by gguf-py (llama.cpp's own
Python package), for crates/retort-model/tests/real_qwen.rs. For each type, the first tensor
of that type (by name) is dequantized to f32; the fixture keeps its size, f64 sum and sum of
squares, and 512 values at evenly spaced flat indices (the file's element order). Run by hand:

    pip install gguf==0.19.0 numpy
    scripts/fetch-assets qwen
    python3 scripts/reference/gguf_dequant.py assets/Qwen2.5-Coder-0.5B-Instruct.gguf \
        assets/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf > crates/retort-model/tests/fixtures/qwen_dequant.json
"""
import importlib.metadata
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

SAMPLES = 512


def main():
    out = {"_header": {"script": "scripts/reference/gguf_dequant.py",
                       "gguf_py": importlib.metadata.version("gguf"),
                       "numpy": np.__version__},
           "files": {}}
    for path in sys.argv[1:]:
        r = GGUFReader(path)
        first = {}
        for t in sorted(r.tensors, key=lambda t: t.name):
            first.setdefault(t.tensor_type.name, t)
        entries = []
        for kind, t in sorted(first.items()):
            v = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
            idx = [i * len(v) // SAMPLES for i in range(SAMPLES)]
            entries.append({
                "type": kind,
                "name": t.name,
                "elements": int(len(v)),
                "sum": float(v.astype(np.float64).sum()),
                "sum_sq": float((v.astype(np.float64) ** 2).sum()),
                "indices": idx,
                "values": [float(v[i]) for i in idx],
            })
        out["files"][os.path.basename(path)] = entries
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
