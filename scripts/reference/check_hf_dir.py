#!/usr/bin/env python3
"""Check a checkpoint directory written by retort with Hugging Face's own Python libraries
(no torch needed): tokenizer.json loads in `tokenizers` and gives llama.cpp's ids on the fixture
text; model.safetensors carries `format = pt` and every tensor config.json implies.

    pip install tokenizers safetensors numpy
    scripts/quickstart            # writes runs/main-job/pruned (the untrained pruned student)
    python3 scripts/reference/check_hf_dir.py runs/main-job/pruned
"""
import json
import sys

from safetensors import safe_open
from tokenizers import Tokenizer

d = sys.argv[1]
fx = json.load(open("crates/retort-model/tests/fixtures/smollm2_llamacpp.json"))
ids = Tokenizer.from_file(f"{d}/tokenizer.json").encode(fx["tokenizer_text"], add_special_tokens=True).ids
assert ids == fx["tokenizer_ids"], "tokenizer.json ids differ from llama.cpp's"
cfg = json.load(open(f"{d}/config.json"))
with safe_open(f"{d}/model.safetensors", "np") as f:
    assert f.metadata().get("format") == "pt", f.metadata()
    names = set(f.keys())
want = {"model.embed_tokens.weight", "model.norm.weight"}
for i in range(cfg["num_hidden_layers"]):
    for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]:
        want.add(f"model.layers.{i}.{n}.weight")
if not cfg["tie_word_embeddings"]:
    want.add("lm_head.weight")
assert want <= names, sorted(want - names)
tc = json.load(open(f"{d}/tokenizer_config.json"))
assert "<|im_start|>" in tc["chat_template"]
print(f"ok: {d}: {len(ids)} fixture ids match llama.cpp, {len(names)} tensors, format=pt, chat template present")
