#!/usr/bin/env python3
"""A standalone reader of retort logit caches (format versions 1 and 2), written from
docs/logit-cache.md alone: an example for other tools, and a check that the document is enough.

    python3 scripts/reference/read_logit_cache.py CACHE_DIR [--show N]

Verifies every shard's size and sha256, decodes every sample, checks each row's probabilities
(top-k plus tail) sum to 1 and, in format 2, that each row's label log-prob is the top-k entry of
the next token where it is there and that the turns' positions hold answer tokens; prints totals
and the first N rows. Needs numpy and zstandard.
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
    version = m["format_version"]
    assert m["format"] == "retort-logit-cache" and version in (1, 2), version
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
            label_logp, turns = None, None
            if version >= 2:
                label_logp = (take("<f4", R) if codec == "f32" else take("<f2", R)).astype(np.float32)
                count = int(take("<u4", 1)[0])
                if count != 0xFFFFFFFF:  # else: this sample stores no turns
                    turns = []
                    for _ in range(count):
                        n_, m_ = (int(x) for x in take("<u4", 2))
                        pos = np.cumsum(take("<u4", n_), dtype=np.uint32)
                        gaps_, lens = take("<u4", n_), take("<u4", n_)
                        offsets, end = [], 0
                        for g_, l_ in zip(gaps_, lens):
                            start = (end + int(g_)) & 0xFFFFFFFF
                            end = (start + int(l_)) & 0xFFFFFFFF
                            offsets.append((start, end))
                        turns.append(dict(positions=pos, offsets=offsets,
                                          end_positions=take("<u4", m_)))
            assert at == len(raw), "bytes left over"
            yield dict(sample=sample, key=key.hex(), tokens=tokens, positions=positions,
                       ids=ids, logp=logp, log_tail=log_tail, label_logp=label_logp,
                       turns=turns), m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("--show", type=int, default=2)
    a = p.parse_args()
    samples = rows = 0
    worst = worst_label = 0.0
    shown = labelled_in_top = turn_tokens = 0
    for s, m in read_cache(Path(a.cache)):
        samples += 1
        rows += len(s["positions"])
        total = np.exp(s["logp"].astype(np.float64)).sum(1) + np.exp(s["log_tail"].astype(np.float64))
        worst = max(worst, float(np.abs(total - 1).max(initial=0)))
        if s["label_logp"] is not None:
            nxt = s["tokens"][s["positions"] + 1]
            for r, y in enumerate(nxt):
                hit = np.nonzero(s["ids"][r] == y)[0]
                # The label's log-prob is its top-k entry: q8 within rounding (1/32 nat), except
                # where the entry's gap below the top-1 saturated (255/16 nat, then clamped).
                saturated = m["encoding"]["codec"] == "q8" and len(hit) and \
                    s["logp"][r][0] - s["logp"][r][hit[0]] >= 255 / 16 - 1e-3
                if len(hit) and not saturated:
                    labelled_in_top += 1
                    worst_label = max(worst_label, abs(float(s["logp"][r][hit[0]] - s["label_logp"][r])))
        for t in s["turns"] or []:
            T = len(s["tokens"])
            inside = [p for p in t["positions"] if p < T]
            turn_tokens += len(t["positions"])
            # Every content token the sample keeps is an answer token: its predecessor is a row.
            assert all(p - 1 in set(s["positions"].tolist()) for p in inside), "turn outside the answer"
        for r in range(min(len(s["positions"]), a.show - shown)):
            print(f"sample {s['sample']} position {s['positions'][r]} (next token "
                  f"{s['tokens'][s['positions'][r] + 1]}): top ids {s['ids'][r][:5].tolist()} "
                  f"logp {np.round(s['logp'][r][:5], 3).tolist()} log_tail {s['log_tail'][r]:.3f}")
            shown += 1
    print(f"{a.cache}: format {m['format_version']}, k={m['k']} codec {m['encoding']['codec']}: "
          f"{samples} samples, {rows} rows; max |sum p - 1| = {worst:.2e}")
    if m["format_version"] >= 2:
        print(f"  label log-probs: {labelled_in_top} of {rows} labels in the top-k, max |label - "
              f"top-k entry| = {worst_label:.2e}; {turn_tokens} teacher content tokens with offsets; "
              f"tokenizer in {m.get('tokenizer')}/")


if __name__ == "__main__":
    main()
