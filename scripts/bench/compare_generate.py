#!/usr/bin/env python3
"""retort's scoring and generation against llama.cpp (llama-cpp-python), alternated, one table.

Runs three sections of `cargo bench -p retort-model --bench model` (`score`: 4x256 with full
logits, f32; `gen1-q8_0`: one stream, Q8_0, <=128 new tokens; `gen8-q8_0`: 8 streams batched)
and scripts/bench/llamacpp_smollm2.py (prompt processing 4x256 and one stream of 128 tokens on
the same GGUF), ROUNDS times in alternation, 2 threads each. Prints a Markdown table of the
medians over rounds, the ratios of issue 8's targets, and each process's peak RSS.

    scripts/bench/compare-llamacpp      # builds, then runs this
"""
import os, re, statistics, subprocess, sys, tempfile

ROUNDS = int(os.environ.get("ROUNDS", "3"))
PY = os.environ.get("LLAMA_PYTHON", sys.executable)
BENCH = sys.argv[1]  # the model bench executable

PATTERNS = {
    "score": re.compile(r"score f32 4x256 \(full logits\): [\d.]+s = ([\d.]+) tok/s"),
    "gen1-q8_0": re.compile(r"generate q8_0 1 stream\(s\).*: ([\d.]+) tok/s aggregate"),
    "gen8-q8_0": re.compile(r"generate q8_0 8 stream\(s\).*: ([\d.]+) tok/s aggregate"),
    "llama-pp": re.compile(r"llama.cpp prompt processing 4x256: ([\d.]+) tok/s"),
    "llama-gen": re.compile(r"llama.cpp generation 1 stream, 128 tokens: ([\d.]+) tok/s"),
}


def run(cmd):
    """Runs cmd; returns its stdout and its own peak RSS in MB (wait4, not the children's max)."""
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    with tempfile.TemporaryFile(mode="w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{text}")
    return text, usage.ru_maxrss // 1024


def grab(key, text, cmd):
    m = PATTERNS[key].search(text)
    if not m:
        sys.exit(f"no `{key}` line from {' '.join(cmd)}:\n{text}")
    return float(m.group(1))


res = {}  # key -> [(tok/s, rss MB)]
for r in range(ROUNDS):
    for section in ["score", "gen1-q8_0", "gen8-q8_0"]:
        cmd = [BENCH, section]
        text, rss = run(cmd)
        tok = grab(section, text, cmd)
        res.setdefault(section, []).append((tok, rss))
        print(f"round {r + 1}: retort {section}: {tok:.1f} tok/s, {rss} MB", flush=True)
    cmd = [PY, "scripts/bench/llamacpp_smollm2.py"]
    text, rss = run(cmd)
    for key in ["llama-pp", "llama-gen"]:
        tok = grab(key, text, cmd)
        res.setdefault(key, []).append((tok, rss))
        print(f"round {r + 1}: {key}: {tok:.1f} tok/s, {rss} MB (both llama.cpp numbers)", flush=True)

med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
rss = {k: max(m for _, m in v) for k, v in res.items()}
runs = {k: ", ".join(f"{t:.1f}" for t, _ in v) for k, v in res.items()}
rows = [
    ("scoring 4x256 (retort: f32, full logits; llama.cpp: prompt processing, last logits)",
     "score", "llama-pp", 1.0),
    ("generation, 1 stream (retort: Q8_0; llama.cpp: the file's Q4_1)", "gen1-q8_0", "llama-gen", 0.8),
    ("generation, 8 streams batched, aggregate (against llama.cpp's 1 stream)",
     "gen8-q8_0", "llama-gen", 2.0),
]
print()
print(f"| what | retort tok/s (median of {ROUNDS}; runs) | retort peak RSS MB "
      f"| llama.cpp tok/s (median; runs) | llama.cpp peak RSS MB | ratio | target |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, ours, theirs, target in rows:
    ratio = med[ours] / med[theirs]
    verdict = "met" if ratio >= target else "not met"
    print(f"| {name} | {med[ours]:.1f} ({runs[ours]}) | {rss[ours]} | {med[theirs]:.1f} ({runs[theirs]}) "
          f"| {rss[theirs]} | {ratio:.2f}x | >= {target}x: {verdict} |")
