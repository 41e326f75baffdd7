#!/usr/bin/env python3
"""Reference token ids, chat prompt and next-token logits for the opt-in Qwen2.5-Coder pair
(1.5B-Instruct Q4_K_M and 0.5B-Instruct), computed by llama.cpp through llama-cpp-python.
Run by hand (not in CI):

    pip install llama-cpp-python==0.3.36
    scripts/fetch-assets qwen
    python3 scripts/reference/llamacpp_qwen.py > crates/retort-model/tests/fixtures/qwen_llamacpp.json

Used by crates/retort-model/tests/real_qwen.rs. The chat prompts are written out by hand in
Qwen2.5's format (its template adds the default system prompt when there is none).
"""
import json
import sys

import llama_cpp
from llama_cpp import Llama

MODELS = {
    "qwen1.5b": "assets/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    "qwen0.5b": "assets/Qwen2.5-Coder-0.5B-Instruct.gguf",
}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Multilingual, code- and digit-heavy text; special tokens included on purpose.
TOKENIZER_TEXT = (
    "Hello world! 12345 don't  spaces\nnewline <|im_start|>user\n"
    "Grüße aus München, ça va? Привет, мир. 東京は晴れ。 مرحبا 🙂🚀\n"
    "def f(x):\n    return x**2 + 3.14159 * x - 1_000_000  # комментарий\n"
    "\tTabs\t and   multiple    spaces; price: $1,299.99 (-15%) on 2024-03-07T12:34:56Z\n"
    "<|im_end|>\n"
)
QUESTION = "Write a Python function that returns the n-th Fibonacci number."


def chat(q, system=DEFAULT_SYSTEM):
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
            "<|im_start|>assistant\n")


def one(path):
    m = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False, logits_all=True)
    tok_ids = m.tokenize(TOKENIZER_TEXT.encode(), add_bos=False, special=True)
    prompt = chat(QUESTION)
    p_ids = m.tokenize(prompt.encode(), add_bos=False, special=True)
    m.reset()
    m.eval(p_ids)
    logits = list(m.scores[m.n_tokens - 1])
    top = sorted(range(len(logits)), key=lambda i: -logits[i])[:5]
    return {
        "model": path,
        "tokenizer_ids": tok_ids,
        "prompt_ids": p_ids,
        "top5_ids": top,
        "top5_logits": [float(logits[i]) for i in top],
        "top5_tokens": [m.detokenize([i]).decode(errors="replace") for i in top],
    }


def main():
    out = {
        "_header": {
            "script": "scripts/reference/llamacpp_qwen.py",
            "llama_cpp_python": llama_cpp.__version__,
            "note": "llama.cpp runs quantized matmuls with Q8 activations; retort scores with dequantized f32 weights",
        },
        "tokenizer_text": TOKENIZER_TEXT,
        "question": QUESTION,
        "prompt": chat(QUESTION),
    }
    for name, path in MODELS.items():
        out[name] = one(path)
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
