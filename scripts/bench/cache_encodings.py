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


def samples():
    for s in m["shards"]:
        b = (d / s["file"]).read_bytes()
        io, n = struct.unpack_from("<QQ", b, len(b) - 24)
        for i in range(n):
            key, smp, T, R, raw, off, ln = struct.unpack_from("<16sIIIIQQ", b, io + 48 * i)
            r = dz.decompress(b[off:off + ln], max_output_size=raw)
            at = T * 4 + R * 4
            if codec == "q8":
                planes = [np.frombuffer(r, np.uint8, R * k, at + j * R * k) for j in range(idb)]
                ids = sum(pl.astype(np.uint32) << (8 * j) for j, pl in enumerate(planes))
                at += idb * R * k
                top = np.frombuffer(r, np.float16, R, at).astype(np.float32); at += 2 * R
                gd = np.frombuffer(r, np.uint8, R * (k - 1), at).reshape(R, k - 1); at += R * (k - 1)
                g = np.concatenate([np.zeros((R, 1)), np.cumsum(gd, 1)], 1)
                lp = top[:, None] - g / 16.0
                tail = np.frombuffer(r, np.float16, R, at).astype(np.float32)
            else:
                ids = np.frombuffer(r, np.uint32, R * k, at); at += 4 * R * k
                lp = np.frombuffer(r, np.float32, R * k, at).reshape(R, k); at += 4 * R * k
                tail = np.frombuffer(r, np.float32, R, at)
            toks = np.frombuffer(r, np.uint32, T, 0)
            pos = np.frombuffer(r, np.uint32, R, T * 4)
            yield toks, pos, ids.reshape(R, k), lp, tail


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
