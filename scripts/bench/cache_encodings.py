#!/usr/bin/env python3
"""Measure candidate encodings of a retort logit cache's top-k values (bytes per token).

Reads an existing cache (any codec: ids exact, log-probs as stored), re-encodes the ids and
log-probs of every sample in several ways with zstd, and prints bytes/token per part.
Usage: scripts/bench/cache_encodings.py CACHE_DIR [--level 9]
"""
import argparse, json, struct, sys
from pathlib import Path

import numpy as np
import zstandard

p = argparse.ArgumentParser()
p.add_argument("cache")
p.add_argument("--level", type=int, default=9)
a = p.parse_args()
d = Path(a.cache)
m = json.loads((d / "manifest.json").read_text())
k, vocab, codec = m["k"], m["teacher"]["vocab_size"], m["encoding"]["codec"]
idb = 2 if (codec == "q8" and vocab <= 65536) else 4
dz = zstandard.ZstdDecompressor()


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from read_logit_cache import read_cache  # noqa: E402


def samples():
    for s_, _ in read_cache(d):
        yield s_["tokens"], s_["positions"], s_["ids"], s_["logp"], s_["log_tail"]


cz = zstandard.ZstdCompressor(level=a.level)
z = lambda x: len(cz.compress(np.ascontiguousarray(x).tobytes()))
tot = {}
rows = 0
def add(name, n):
    tot[name] = tot.get(name, 0) + n

for toks, pos, ids, lp, tail in samples():
    R = ids.shape[0]
    rows += R
    add("tokens+positions (u32, zstd)", z(toks) + z(pos))
    u16 = ids.astype(np.uint16)
    add("ids u16 plain", z(u16))
    add("ids u16 byte planes", z(np.concatenate([(u16 & 255).astype(np.uint8).ravel(), (u16 >> 8).astype(np.uint8).ravel()])))
    add("ids u16 column-major (rank planes)", z(u16.T))
    add("ids u16 byte planes, column-major", z(np.concatenate([(u16.T & 255).astype(np.uint8).ravel(), (u16.T >> 8).astype(np.uint8).ravel()])))
    srt = np.sort(ids, 1).astype(np.int64)
    gaps = np.diff(np.concatenate([np.zeros((R, 1), np.int64), srt], 1), axis=1)
    perm = np.argsort(np.argsort(ids, 1), 1).astype(np.uint8)  # rank order → position in sorted row
    add("ids sorted deltas (u16 planes) + permutation u8", z(np.concatenate([(gaps & 255).astype(np.uint8).ravel(), (gaps >> 8).astype(np.uint8).ravel()])) + z(perm))
    for step in (16, 8, 4):
        g = np.clip(np.round((lp[:, :1] - lp[:, 1:]) * step), 0, 255).astype(np.uint8)
        g = np.maximum.accumulate(g, 1)
        dg = np.diff(np.concatenate([np.zeros((R, 1), np.uint8), g], 1), axis=1).astype(np.uint8)
        add(f"logp gaps 1/{step} nat, delta u8", z(dg))
        add(f"logp gaps 1/{step} nat, delta u8 column-major", z(dg.T))
    add("logp f16", z(lp.astype(np.float16)))
    add("logp f32", z(lp.astype(np.float32)))
    add("top-1 + tail f16", z(lp[:, 0].astype(np.float16)) + z(tail.astype(np.float16)))

print(f"{d}: {rows} tokens, k={k}, stored codec {codec}, zstd level {a.level}")
for name, n in tot.items():
    print(f"{n / rows:8.1f} B/token  {name}")
