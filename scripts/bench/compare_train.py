#!/usr/bin/env python3
"""retort's KD training step against PyTorch + transformers, alternated, one table.

Runs `cargo bench -p retort-distill --bench train` and scripts/bench/torch_train.py in each
configuration, ROUNDS times in alternation (retort, PyTorch, retort, ...), and prints a Markdown
table of the medians over rounds with the ratio to PyTorch's best configuration for the same
teacher mode, and peak RSS. Same student (10 of 30 layers of SmolLM2-135M-Instruct), batch 4x256,
forward KL at every position, AdamW, 2 threads.

On a CPU without bf16 instructions only the f32 configurations run (BF16=1 forces the others).

Teacher modes:
  online  the 30-layer teacher runs in every step (f32 weights);
  cached  the teacher's targets are computed once before the timed steps: retort reads top-64
          (what `retort label` stores), PyTorch full-vocabulary fp16 log-probs (a dense cache,
          as in ../shared/design/reference-experiment.md).

    scripts/bench/compare-torch      # builds, makes the HF dirs, then runs this
"""
import itertools, os, re, statistics, subprocess, sys

ROUNDS = int(os.environ.get("ROUNDS", "2"))
STEPS = os.environ.get("STEPS", "6")
PY = os.environ.get("TORCH_PYTHON", sys.executable)
BENCH = sys.argv[1]  # the train bench executable

# bf16 products need the CPU's bf16 instructions (AVX-512 BF16 or AMX). Without them retort's
# `matmul = "bf16"` is its f32 path and PyTorch's bf16 autocast is emulated (one 6-step online
# run had not finished after 11 minutes on an AVX2 EPYC, where the f32 one ran at 154 tok/s), so
# the bf16 configurations are skipped there and PyTorch runs the cached teacher in f32 instead;
# BF16=1 runs them anyway, BF16=0 skips them on any CPU.
def cpu_has_bf16():
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16 = {"1": True, "0": False}.get(os.environ.get("BF16", ""), cpu_has_bf16())
if BF16:
    RETORT = [("online", "f32"), ("online", "bf16"), ("cached", "f32"), ("cached", "bf16")]
    TORCH = [("online", "none"), ("online", "bf16"), ("cached", "bf16")]
else:
    print("this CPU has no bf16 instructions (avx512_bf16, amx_bf16): f32 configurations only", flush=True)
    RETORT = [("online", "f32"), ("cached", "f32")]
    TORCH = [("online", "none"), ("cached", "none")]
MEAN = re.compile(r"MEAN steps 1\.\.: ([\d.]+)s/step = ([\d.]+) tok/s; peak RSS (\d+) MB")


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    m = MEAN.search(out.stdout)
    if not m:
        sys.exit(f"no MEAN line from {' '.join(cmd)}:\n{out.stdout}\n{out.stderr}")
    return float(m.group(2)), int(m.group(3))


res = {}
for r in range(ROUNDS):
    for (mode, mm), theirs in itertools.zip_longest(RETORT, TORCH):
        tok, rss = run([BENCH, "--steps", STEPS, "--teacher", mode, "--matmul", mm])
        res.setdefault(("retort", mode, mm), []).append((tok, rss))
        print(f"round {r + 1}: retort {mode} matmul {mm}: {tok:.1f} tok/s, {rss} MB", flush=True)
        if theirs is None:
            continue
        tmode, ac = theirs
        tok, rss = run([PY, "scripts/bench/torch_train.py", "--threads", "2", "--steps", STEPS,
                        "--autocast", ac, "--teacher-logits", tmode])
        res.setdefault(("torch", tmode, ac), []).append((tok, rss))
        print(f"round {r + 1}: pytorch {tmode} autocast {ac}: {tok:.1f} tok/s, {rss} MB", flush=True)

med = {k: (statistics.median(t for t, _ in v), max(m for _, m in v), [t for t, _ in v]) for k, v in res.items()}
best = {}
for (who, mode, cfg), (tok, _, _) in med.items():
    if who == "torch" and tok > best.get(mode, (0, ""))[0]:
        best[mode] = (tok, cfg)
print()
print(f"| configuration | tok/s (median of {ROUNDS}; runs) | peak RSS MB | ratio to PyTorch's best (same teacher mode) |")
print("| --- | --- | --- | --- |")
for (who, mode, cfg), (tok, rss, runs) in sorted(med.items()):
    name = f"retort, teacher {mode}, matmul {cfg}" if who == "retort" else f"PyTorch, teacher {mode}, autocast {cfg}"
    ratio = tok / best[mode][0] if mode in best else float("nan")
    print(f"| {name} | {tok:.1f} ({', '.join(f'{x:.1f}' for x in runs)}) | {rss} | {ratio:.2f}x |")
