#!/usr/bin/env python3
"""PyTorch reference values and gradients for retort's KD losses.

Writes crates/retort-distill/tests/fixtures/kd_losses_torch.json: random student/teacher logits
(N=5 rows, V=13), targets, and for each (divergence, temperature) the summed loss and its gradient
with respect to the student logits, computed with torch.nn.functional. The definitions follow
TRL's `generalized_jsd_loss` (GKD) and DistiLLM's skew KL; `retort-distill/tests/reference.rs`
compares against this file. Run: python3 scripts/reference/kd_losses.py (torch >= 2).
"""
import json, math, pathlib
import torch
import torch.nn.functional as F

torch.manual_seed(0)
N, V = 5, 13
student = (torch.randn(N, V, dtype=torch.float64) * 2.0)
teacher = (torch.randn(N, V, dtype=torch.float64) * 2.0)
targets = torch.randint(0, V, (N,))


def kl(log_p, log_q):
    # KL(p||q) summed over rows, as F.kl_div(input=log q, target=log p, log_target=True).
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def divergence(kind, arg, s, t, T):
    ls = F.log_softmax(s / T, dim=-1)
    lt = F.log_softmax(t / T, dim=-1)
    if kind == "forward_kl":
        v = kl(lt, ls)
    elif kind == "reverse_kl":
        v = kl(ls, lt)
    elif kind == "jsd":
        beta = arg
        if beta == 0.0:
            v = kl(lt, ls)
        elif beta == 1.0:
            v = kl(ls, lt)
        else:  # TRL: mixture = logsumexp([ls + log(1-beta), lt + log(beta)])
            lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
            v = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    elif kind == "skew_forward_kl":  # KL(p || a p + (1-a) q)
        a = arg
        lm = torch.log(a * lt.exp() + (1 - a) * ls.exp())
        v = kl(lt, lm)
    elif kind == "skew_reverse_kl":  # KL(q || (1-a) p + a q)
        a = arg
        lm = torch.log((1 - a) * lt.exp() + a * ls.exp())
        v = kl(ls, lm)
    elif kind == "tvd":
        v = 0.5 * (lt.exp() - ls.exp()).abs().sum()
    else:
        raise ValueError(kind)
    return v * T * T


cases = []
for kind, arg in [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.1),
                  ("jsd", 0.0), ("jsd", 1.0), ("skew_forward_kl", 0.1),
                  ("skew_reverse_kl", 0.1), ("tvd", None)]:
    for T in (1.0, 2.0):
        for alpha in (1.0, 0.5):  # weight of KD in (1-alpha)*CE + alpha*KD
            s = student.clone().requires_grad_(True)
            kd = divergence(kind, arg, s, teacher, T)
            ce = F.cross_entropy(s, targets, reduction="sum")
            loss = (1 - alpha) * ce + alpha * kd
            loss.backward()
            name = kind if arg is None else f"{kind}:{arg}"
            cases.append({"loss": name, "temperature": T, "alpha": alpha,
                          "kd": kd.item(), "ce": ce.item(), "total": loss.item(),
                          "grad": s.grad.tolist()})

out = {"generator": "scripts/reference/kd_losses.py", "torch": torch.__version__,
       "student": student.tolist(), "teacher": teacher.tolist(), "targets": targets.tolist(),
       "cases": cases}
path = pathlib.Path(__file__).resolve().parents[2] / "crates/retort-distill/tests/fixtures/kd_losses_torch.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {len(cases)} cases to {path}")
