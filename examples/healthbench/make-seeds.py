#!/usr/bin/env python3
"""Draw seed questions for the HealthBench synth example from the HealthBench train split that
scripts/fetch-assets extracts (assets/data/healthbench/train.jsonl): single-turn user prompts of
40-160 characters, the first 8 in file order (deterministic). Writes seeds.jsonl next to this file.

    python3 examples/healthbench/make-seeds.py
"""
import json
import pathlib

here = pathlib.Path(__file__).resolve().parent
src = here.parent.parent / "assets" / "data" / "healthbench" / "train.jsonl"
if not src.exists():
    raise SystemExit(f"{src} is missing\nhint: run scripts/fetch-assets first")
seeds = []
for line in src.open():
    rec = json.loads(line)
    users = [m for m in rec["messages"] if m["role"] == "user"]
    if len(users) != 1:
        continue
    q = " ".join(users[0]["content"].split())
    if 40 <= len(q) <= 160 and "\n" not in q:
        seeds.append({"id": rec["id"], "question": q})
    if len(seeds) == 8:
        break
(here / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
print(f"wrote {len(seeds)} seeds to {here / 'seeds.jsonl'}")
