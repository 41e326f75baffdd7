#!/usr/bin/env python3
"""Greedy answers of several models side by side, from `retort eval --generate N --json FILE`:
for each held-out question, the reference answer, then each named model's answer.

    python3 scripts/answers-side-by-side.py EVAL.json DATA.jsonl OUT.md MODEL [MODEL ...]

MODEL names are the `--model NAME=PATH` names given to `retort eval`; the questions are the
last user turn of each DATA record, matched by `id`.
"""
import json
import sys

if len(sys.argv) < 5:
    raise SystemExit(__doc__)
eval_path, data_path, out_path, *names = sys.argv[1:]
runs = {r["model"]: r for r in json.load(open(eval_path))}
missing = [n for n in names if n not in runs]
if missing:
    raise SystemExit(f"error: {eval_path} has no model named {missing}; it has {sorted(runs)}")
questions = {}
for line in open(data_path):
    rec = json.loads(line)
    users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
    questions[rec.get("id")] = users[-1] if users else ""
examples = {n: {e["id"]: e for e in (runs[n].get("generation") or {}).get("examples", [])} for n in names}
ids = [i for i in examples[names[-1]] if all(i in examples[n] for n in names)]
with open(out_path, "w") as f:
    f.write(f"# Greedy answers on {len(ids)} held-out questions: {', '.join(names)}\n\n")
    f.write(f"From `{eval_path}`; ROUGE-L F against the physician's answer in brackets.\n\n")
    for i in ids:
        f.write(f"## {' '.join(questions.get(i, str(i)).split())}\n\n")
        ref = " ".join(examples[names[0]][i].get("reference", "").split())
        f.write(f"**Physician (reference)**: {ref}\n\n")
        for n in names:
            e = examples[n][i]
            text = " ".join(e.get("generated", "").split())
            f.write(f"**{n}** [{e.get('rouge_l', 0):.3f}]: {text}\n\n")
print(f"{len(ids)} questions side by side in {out_path}", file=sys.stderr)
