#!/usr/bin/env python3
"""A standalone reader of retort logit caches (format version 1), written from
docs/logit-cache.md alone: an example for other tools, and a check that the document is enough.

    python3 scripts/reference/read_logit_cache.py CACHE_DIR [--show N]

Verifies every shard's size and sha256, decodes every sample, checks each row's probabilities
(top-k plus tail) sum to 1, and prints totals and the first N rows. Needs numpy and zstandard.
"""
import argparse
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import zstandard


def read_cache(d: Path):
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "retort-logit-cache" and m["format_version"] == 1, m["format_version"]
    k, vocab = m["k"], m["teacher"]["vocab_size"]
    codec = m["encoding"]["codec"]
    id_dtype = np.uint16 if m["encoding"]["ids"] == "u16" else np.uint32
    dz = zstandard.ZstdDecompressor()
    for s in m["shards"]:
        b = (d / s["file"]).read_bytes()
        assert len(b) == s["bytes"], f"{s['file']}: truncated"
        assert hashlib.sha256(b).hexdigest() == s["sha256"], f"{s['file']}: checksum"
        assert b[:8] == b"RTLCSHD1" and b[-8:] == b"RTLCEND1"
        index_offset, n = struct.unpack_from("<QQ", b, len(b) - 24)
        for i in range(n):
            key, sample, T, R, raw_len, off, ln = struct.unpack_from(
                "<16sIIIIQQ", b, index_offset + 48 * i)
            raw = dz.decompress(b[off:off + ln], max_output_size=raw_len)
            at = 0

            def take(dtype, count):
                nonlocal at
                x = np.frombuffer(raw, dtype, count, at)
                at += x.nbytes
                return x

            tokens = take("<u4", T)
            positions = np.cumsum(take("<u4", R), dtype=np.uint32)
            if codec == "f32":
                ids = take("<u4", R * k).reshape(R, k)
                logp = take("<f4", R * k).reshape(R, k)
                log_tail = take("<f4", R)
            else:  # q8: rows keep c_r <= k entries; the rest are id NONE, log-prob -inf
                counts = (take("u1", R) if k <= 255 else take("<u2", R)).astype(np.int64)
                kept = int(counts.sum())
                nb = np.dtype(id_dtype).itemsize
                packed = sum(take("u1", kept).astype(np.uint32) << (8 * j) for j in range(nb))
                top = take("<f2", R).astype(np.float32)
                gaps = take("u1", kept - R)
                ids = np.full((R, k), 0xFFFFFFFF, np.uint32)
                logp = np.full((R, k), -np.inf, np.float32)
                at_id = at_gap = 0
                for r in range(R):
                    c = counts[r]
                    ids[r, :c] = packed[at_id:at_id + c]
                    at_id += c
                    g = np.concatenate([[0], np.cumsum(gaps[at_gap:at_gap + c - 1])])
                    at_gap += c - 1
                    logp[r, :c] = top[r] - g / 16.0
                log_tail = take("<f2", R).astype(np.float32)
            assert at == len(raw), "bytes left over"
            yield dict(sample=sample, key=key.hex(), tokens=tokens, positions=positions,
                       ids=ids, logp=logp, log_tail=log_tail), m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("--show", type=int, default=2)
    a = p.parse_args()
    samples = rows = 0
    worst = 0.0
    shown = 0
    for s, m in read_cache(Path(a.cache)):
        samples += 1
        rows += len(s["positions"])
        total = np.exp(s["logp"].astype(np.float64)).sum(1) + np.exp(s["log_tail"].astype(np.float64))
        worst = max(worst, float(np.abs(total - 1).max(initial=0)))
        for r in range(min(len(s["positions"]), a.show - shown)):
            print(f"sample {s['sample']} position {s['positions'][r]} (next token "
                  f"{s['tokens'][s['positions'][r] + 1]}): top ids {s['ids'][r][:5].tolist()} "
                  f"logp {np.round(s['logp'][r][:5], 3).tolist()} log_tail {s['log_tail'][r]:.3f}")
            shown += 1
    print(f"{a.cache}: k={m['k']} codec {m['encoding']['codec']}: {samples} samples, {rows} rows; "
          f"max |sum p - 1| = {worst:.2e}")


if __name__ == "__main__":
    main()
