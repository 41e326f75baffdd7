#!/usr/bin/env python3
"""PyTorch + transformers baseline for retort's KD training bench (same config, same shapes).

A 10-layer student (layers 0,3,6,10,13,16,19,23,26,29 of SmolLM2-135M-Instruct, as
`retort init-student --num-layers 10` builds it) trained with forward KL against the online f32
teacher on a 4x256 batch of the same deterministic token ids as
crates/retort-distill/benches/train.rs; AdamW (torch.optim, fused where available). Reports tokens/s per step and
peak RSS. Both models are read from HF directories written by retort itself:

    retort init-student --teacher assets/SmolLM2-135M-Instruct.Q4_1.gguf --num-layers 30 --out runs/bench/teacher-hf
    retort init-student --teacher assets/SmolLM2-135M-Instruct.Q4_1.gguf --num-layers 10 --out runs/bench/student-10l
    python3 scripts/bench/torch_train.py [--threads 2] [--steps 5]

(scripts/bench/compare-torch does all of this and alternates with retort's bench.)

Real students with PEFT's LoRA and cross-entropy on the same shapes (no teacher needed), e.g. the
Qwen2.5-Coder-0.5B student against `retort train` with `[student] lora` (docs/performance.md):

    retort init-student --teacher assets/Qwen2.5-Coder-0.5B-Instruct.gguf --num-layers 24 --out runs/bench/qwen05-hf
    python3 scripts/bench/torch_train.py --student runs/bench/qwen05-hf --loss ce --lora 16 --autocast bf16
"""
import argparse, resource, time
import torch
import transformers
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--teacher", default="runs/bench/teacher-hf")
p.add_argument("--student", default="runs/bench/student-10l")
p.add_argument("--autocast", choices=["none", "bf16"], default="none",
               help="bf16: torch.autocast('cpu', bfloat16) around the forward passes (the reference experiment's setting)")
p.add_argument("--teacher-logits", choices=["online", "cached"], default="online",
               help="cached: the teacher's log-probs are computed once before the timed steps (fp16, full vocabulary), as a dense logit cache")
p.add_argument("--loss", choices=["kd", "ce"], default="kd",
               help="ce: next-token cross-entropy on the ids themselves (SFT; no teacher is loaded)")
p.add_argument("--lora", type=int, default=0,
               help="R > 0: train PEFT LoRA adapters of rank R (alpha 2R, dropout 0) on q,k,v,o,gate,up,down of a frozen base")
a = p.parse_args()
torch.set_num_threads(a.threads)
teacher = None
if a.loss == "kd":
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32, attn_implementation="sdpa").eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32, attn_implementation="sdpa").train()
if a.lora > 0:
    from peft import LoraConfig, get_peft_model
    student = get_peft_model(student, LoraConfig(
        r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
nparams = sum(q.numel() for q in student.parameters() if q.requires_grad)
print(f"torch {torch.__version__} transformers {transformers.__version__} threads {torch.get_num_threads()}: "
      f"student {student.config.num_hidden_layers} layers ({nparams/1e6:.1f}M trained params, lora r={a.lora}), "
      f"batch {a.batch}x{a.seq}, loss {a.loss}, autocast {a.autocast}, teacher {a.teacher_logits if teacher else 'none'}")
import contextlib
def amp():
    return torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast == "bf16" else contextlib.nullcontext()
V = student.config.vocab_size
B, T = a.batch, a.seq
ids = torch.tensor([(i * 2654435761) % V for i in range(B * T)], dtype=torch.long).view(B, T)
opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
cached = None
if teacher is not None and a.teacher_logits == "cached":
    with torch.no_grad(), amp():
        cached = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1).half()
    del teacher
times = []
for step in range(a.steps):
    t0 = time.time()
    if a.loss == "kd":
        if cached is not None:
            t_logp = cached.float()
        else:
            with torch.no_grad(), amp():
                t_logp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
    with amp():
        s_logits = student(input_ids=ids).logits[:, :-1]
    s_logp = torch.log_softmax(s_logits.float(), -1)
    n = B * (T - 1)
    if a.loss == "kd":
        loss = (t_logp.exp() * (t_logp - s_logp)).sum() / n
    else:
        loss = -s_logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum() / n
    t1 = time.time()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.time()
    opt.step()
    dt = time.time() - t0
    print(f"step {step}: loss {loss.item():.4f} fwd {t1-t0:.2f}s bwd {t2-t1:.2f}s adamw {time.time()-t2:.2f}s "
          f"total {dt:.2f}s = {B*T/dt:.1f} tok/s", flush=True)
    if step > 0:
        times.append(dt)
mean = sum(times) / len(times)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"MEAN steps 1..: {mean:.2f}s/step = {B*T/mean:.1f} tok/s; peak RSS {rss:.0f} MB")
