#!/usr/bin/env python3
"""llama.cpp's view of a GGUF file, for `crates/retort-model/tests/export_gguf.rs`: the token ids
of a text (special tokens parsed) and the next-token logits after a given id sequence, as JSON on
stdout. Needs llama-cpp-python (the test runs this with `RETORT_LLAMA_PYTHON`, a Python that has
it; `scripts/bench/llamacpp_smollm2.py` says how it is built here).

    python3 scripts/reference/llamacpp_logits.py FILE.gguf TEXT_FILE IDS_JSON_FILE
"""
import json
import sys

from llama_cpp import Llama

path, text_file, ids_file = sys.argv[1:4]
text = open(text_file, encoding="utf-8").read()
ids = json.load(open(ids_file))
m = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=max(512, len(ids) + 8),
          verbose=False, logits_all=True)
text_ids = m.tokenize(text.encode(), add_bos=False, special=True)
m.reset()
m.eval(ids)
logits = [float(x) for x in m.scores[m.n_tokens - 1]]
print(json.dumps({"text_ids": text_ids, "logits": logits, "n_vocab": m.n_vocab()}))
