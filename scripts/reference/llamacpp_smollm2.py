#!/usr/bin/env python3
"""Reference token ids, next-token logits and a greedy answer for SmolLM2-135M-Instruct (GGUF Q4_1),
computed by llama.cpp through llama-cpp-python. Run by hand (not in CI):

    pip install llama-cpp-python==0.3.36       # builds llama.cpp from source, ~15 min on 2 cores
    scripts/fetch-assets
    python3 scripts/reference/llamacpp_smollm2.py > crates/retort-model/tests/fixtures/smollm2_llamacpp.json

Used by crates/retort-model/tests/real_model.rs.
"""
import json
import sys

import llama_cpp
from llama_cpp import Llama

GGUF = "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Multilingual, code- and digit-heavy text; special tokens included on purpose.
TOKENIZER_TEXT = (
    "Hello world! 12345 don't  spaces\nnewline <|im_start|>user\n"
    "Grüße aus München, ça va? Привет, мир. 東京は晴れ。 مرحبا 🙂🚀\n"
    "def f(x):\n    return x**2 + 3.14159 * x - 1_000_000  # комментарий\n"
    "\tTabs\t and   multiple    spaces; price: $1,299.99 (-15%) on 2024-03-07T12:34:56Z\n"
    "<|im_end|>\n"
)


def chat(q):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
            "<|im_start|>assistant\n")


def main():
    m = Llama(model_path=GGUF, n_threads=2, n_threads_batch=2, n_ctx=1024, verbose=False, logits_all=True)
    tok_ids = m.tokenize(TOKENIZER_TEXT.encode(), add_bos=False, special=True)

    prompt = chat("What is the capital of France?")
    p_ids = m.tokenize(prompt.encode(), add_bos=False, special=True)
    m.reset()
    m.eval(p_ids)
    logits = list(m.scores[m.n_tokens - 1])
    top = sorted(range(len(logits)), key=lambda i: -logits[i])[:5]

    sky = chat("Why is the sky blue?")
    s_ids = m.tokenize(sky.encode(), add_bos=False, special=True)
    m.reset()
    m.eval(s_ids)
    out = []
    for _ in range(64):
        t = m.sample(temp=0.0, top_k=1)
        if t == m.token_eos() or t == 2:
            break
        out.append(t)
        m.eval([t])

    json.dump({
        "_header": {
            "script": "scripts/reference/llamacpp_smollm2.py",
            "llama_cpp_python": llama_cpp.__version__,
            "model": GGUF,
            "note": "llama.cpp runs Q4_1 matmuls with Q8 activations; retort scores with dequantized f32 weights",
        },
        "tokenizer_text": TOKENIZER_TEXT,
        "tokenizer_ids": tok_ids,
        "prompt": prompt,
        "prompt_ids": p_ids,
        "top5_ids": top,
        "top5_logits": [float(logits[i]) for i in top],
        "top5_tokens": [m.detokenize([i]).decode(errors="replace") for i in top],
        "sky_prompt_ids": s_ids,
        "sky_greedy_ids": out,
        "sky_greedy_text": m.detokenize(out).decode(errors="replace"),
    }, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
