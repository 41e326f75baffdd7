#!/usr/bin/env python3
"""Reference renderings of Qwen2.5's chat template by transformers (the template and tokenizer
read from the GGUF file itself, offline), for crates/retort-model/tests/real_qwen.rs: each
conversation's text and token ids, with and without the generation prompt. Run by hand:

    pip install transformers gguf
    scripts/fetch-assets qwen
    python3 scripts/reference/hf_qwen_template.py > crates/retort-model/tests/fixtures/qwen_template.json
"""
import importlib.metadata
import json
import sys

from transformers import AutoTokenizer

GGUF = "Qwen2.5-Coder-0.5B-Instruct.gguf"
CONVERSATIONS = [
    # No system message: the template adds Qwen's default one.
    [{"role": "user", "content": "Write a haiku about compilers."}],
    # A system message of the user's own, and two full turns.
    [{"role": "system", "content": "You are a terse stock-market advisor. Explain your reasoning."},
     {"role": "user", "content": "Context: 35, moderate risk.\nShould I buy index funds?"},
     {"role": "assistant", "content": "Yes: broad, cheap diversification suits a moderate-risk 35-year-old."},
     {"role": "user", "content": "And bonds?"},
     {"role": "assistant", "content": "Some, e.g. 20 %, to dampen drawdowns."}],
    # Unicode, code and whitespace inside turns.
    [{"role": "user", "content": "Grüße! 東京は晴れ。\n```python\nprint('x')\n```\n\n  trailing  "},
     {"role": "assistant", "content": "def f():\n\treturn 1  # ок"}],
]


def main():
    tok = AutoTokenizer.from_pretrained("assets", gguf_file=GGUF)
    out = {"_header": {"script": "scripts/reference/hf_qwen_template.py",
                       "transformers": importlib.metadata.version("transformers"),
                       "model": f"assets/{GGUF}"},
           "cases": []}
    for conv in CONVERSATIONS:
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                msgs = conv[:-1]  # a prompt: everything before the last answer
            else:
                msgs = conv
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out["cases"].append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
