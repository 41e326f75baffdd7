#!/usr/bin/env python3
"""Peer numbers from llama.cpp (llama-cpp-python) on the same GGUF and threads as
`cargo bench -p retort-model --bench model`: prompt processing (scoring) and single-stream
generation. Run both in the same session to compare.

    pip install llama-cpp-python==0.3.36   # on the first Intel host built with
    # CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
    # (the native build died with SIGILL there); on the AMX Xeon with AVX-512 on and AMX off
    # (the native build segfaulted), flags in docs/performance-history.md
    python3 scripts/bench/llamacpp_smollm2.py [GGUF]   # default: the SmolLM2 teacher
"""
import statistics
import sys
import time

from llama_cpp import Llama

GGUF = sys.argv[1] if len(sys.argv) > 1 else "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n")

m = Llama(model_path=GGUF, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=512, verbose=False, logits_all=False)
text = open("crates/retort-model/src/model.rs").read() + open("README.md").read()
ids = m.tokenize(text.encode(), add_bos=False)
ids = (ids * 4)[:1024]

pp = []
for _ in range(3):
    m.reset()
    t0 = time.time()
    for i in range(4):  # four sequences of 256, as retort's 4x256 scoring batch
        m.reset()
        m.eval(ids[i * 256:(i + 1) * 256])
    pp.append(1024 / (time.time() - t0))
print(f"llama.cpp prompt processing 4x256: {statistics.median(pp):.1f} tok/s (last-position logits only)")

p = m.tokenize(PROMPT.encode(), add_bos=False, special=True)
gen = []
for _ in range(3):
    m.reset()
    m.eval(p)
    n = 0
    t0 = time.time()
    for _ in range(128):
        t = m.sample(temp=0.8, top_p=0.95)
        n += 1
        m.eval([t])
    gen.append(n / (time.time() - t0))
print(f"llama.cpp generation 1 stream, 128 tokens: {statistics.median(gen):.1f} tok/s")
