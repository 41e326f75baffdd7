#!/usr/bin/env python3
"""Check a LoRA student written by retort with Hugging Face's own libraries: the PEFT adapter
(`MODEL/adapter`) loads in `peft` on the base checkpoint and gives the logits of the merged
checkpoint retort wrote (`MODEL`), which in turn equal retort's base + adapter logits
(`crates/retort-model/tests/lora.rs`). Also checks that the adapter moves the logits at all,
so the comparison cannot pass vacuously.

    pip install torch transformers peft safetensors
    python3 scripts/reference/peft_adapter.py BASE_HF_DIR RUN/model [--tol 2e-3]

BASE_HF_DIR is the student's starting checkpoint as a Hugging Face directory (for a GGUF
student, `retort init-student --teacher FILE.gguf --num-layers ALL --out DIR` writes one, ALL
being its layer count). Prints one line of
numbers and exits non-zero when a check fails.
"""
import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("--tol", type=float, default=2e-3, help="max |logit difference| allowed")
args = ap.parse_args()

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(args.model)
messages = [
    {"role": "user", "content": "My father has chest pain when he climbs stairs. What should he do?"},
    {"role": "assistant", "content": "Chest pain on exertion can be angina. He should see a doctor soon."},
]
ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
base.eval()
base_logits = logits(base)
peft_model = PeftModel.from_pretrained(base, f"{args.model}/adapter")
peft_model.eval()
peft_logits = logits(peft_model)
merged = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
merged.eval()
merged_logits = logits(merged)

diff = (peft_logits - merged_logits).abs().max().item()
moved = (peft_logits - base_logits).abs().max().item()
argmax_agree = (peft_logits.argmax(-1) == merged_logits.argmax(-1)).float().mean().item()
cfg = json.load(open(f"{args.model}/adapter/adapter_config.json"))
print(
    f"positions {ids.shape[1]}: max |peft - merged| = {diff:.3g} (tol {args.tol}), "
    f"adapter moves logits by up to {moved:.3g}, argmax agreement {argmax_agree:.3f}; "
    f"r={cfg['r']} alpha={cfg['lora_alpha']} targets={cfg['target_modules']}"
)
ok = diff <= args.tol and moved > 10 * args.tol and argmax_agree == 1.0
sys.exit(0 if ok else 1)
