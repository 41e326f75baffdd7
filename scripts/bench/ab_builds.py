#!/usr/bin/env python3
"""Two builds of retort's own benches, alternated on this host: was a change slower?

    python3 scripts/bench/ab_builds.py OLD_TRAIN NEW_TRAIN OLD_MODEL NEW_MODEL

Each argument is a bench executable (`cargo bench -p retort-distill --bench train --no-run` and
`cargo bench -p retort-model --bench model --no-run` print their paths; keep the old ones before
rebuilding). Per round, old then new (then new then old in the next round, so neither always
runs second): the KD training step with the online and the cached teacher (`--steps STEPS`),
scoring 4x256 in f32, single-stream and 8-stream Q8_0 generation. Prints medians over ROUNDS
(default 3) and new/old. 2 threads. Nothing else should run meanwhile.
"""
import os, re, statistics, subprocess, sys

ROUNDS = int(os.environ.get("ROUNDS", "3"))
STEPS = os.environ.get("STEPS", "5")
old_train, new_train, old_model, new_model = sys.argv[1:5]
ENV = dict(os.environ, RAYON_NUM_THREADS="2")
MEAN = re.compile(r"MEAN steps 1\.\.: [\d.]+s/step = ([\d.]+) tok/s")
CASES = [
    ("train online f32", "train", ["--steps", STEPS, "--teacher", "online", "--matmul", "f32"], MEAN),
    ("train cached f32", "train", ["--steps", STEPS, "--teacher", "cached", "--matmul", "f32"], MEAN),
    # The model bench's own lines, as scripts/bench/compare_generate.py reads them.
    ("score-f32", "model", ["score-f32"], re.compile(r"score f32 4x256 \(full logits\): [\d.]+s = ([\d.]+) tok/s")),
    ("gen1-q8_0", "model", ["gen1-q8_0"], re.compile(r"generate q8_0 1 stream\(s\).*: ([\d.]+) tok/s aggregate")),
    ("gen8-q8_0", "model", ["gen8-q8_0"], re.compile(r"generate q8_0 8 stream\(s\).*: ([\d.]+) tok/s aggregate")),
]


def run(exe, args, pattern):
    out = subprocess.run([exe, *args], capture_output=True, text=True, env=ENV)
    m = pattern.search(out.stdout)
    if not m:
        sys.exit(f"no throughput from {exe} {' '.join(args)}:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1))


res = {}
for r in range(ROUNDS):
    order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
    for name, which, args, pattern in CASES:
        for build in order:
            exe = {"train": {"old": old_train, "new": new_train},
                   "model": {"old": old_model, "new": new_model}}[which][build]
            tok = run(exe, args, pattern)
            res.setdefault((name, build), []).append(tok)
            print(f"round {r + 1}: {name} {build}: {tok:.1f} tok/s", flush=True)

print()
print(f"| bench | old tok/s (median of {ROUNDS}; runs) | new tok/s (median; runs) | new/old |")
print("| --- | --- | --- | --- |")
for name, *_ in CASES:
    o, n = res[(name, "old")], res[(name, "new")]
    mo, mn = statistics.median(o), statistics.median(n)
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)
    print(f"| {name} | {mo:.1f} ({fmt(o)}) | {mn:.1f} ({fmt(n)}) | {mn / mo:.3f} |")
