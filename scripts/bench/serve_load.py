#!/usr/bin/env python3
"""Load `retort serve` (or any OpenAI-compatible server) with concurrent clients of mixed
lengths, on loopback, for a bounded time, and print one JSON line of results.

Usage: serve_load.py URL --short N --long M [--seconds S] [--short-tokens T] [--long-tokens L]

Each client sends chat requests back to back until the deadline (a request in flight at the
deadline is finished and counted). Short clients ask for --short-tokens, long ones for
--long-tokens with `ignore_eos` (servers that do not know it may stop earlier; the tokens
actually generated are counted from `usage`). Reported: latency percentiles of the short
requests, their count, and the aggregate completion tokens per second of all clients.
Standard library only.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

QUESTIONS = [
    "Why is the sky blue?",
    "What is a stock dividend?",
    "How do index funds work?",
    "Name three ways to lower blood pressure.",
    "What does a central bank do?",
    "Explain compound interest.",
    "What is inflation?",
    "How should I think about an emergency fund?",
]
LONG = "Explain in detail, step by step, how a household should plan its budget, savings and investments for the next ten years."


def post(url, body, timeout):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.request("POST", u.path + "/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return json.loads(data)


def client(url, kind, idx, deadline, args, out, lock):
    n = 0
    while time.time() < deadline and n < args.max_requests:
        q = QUESTIONS[(idx + n) % len(QUESTIONS)] if kind == "short" else LONG
        body = {
            "messages": [{"role": "user", "content": q}],
            "max_tokens": args.short_tokens if kind == "short" else args.long_tokens,
            "temperature": 0.7,
            "seed": 1000 * idx + n,
        }
        if kind == "long":
            body["ignore_eos"] = True
        t0 = time.time()
        try:
            r = post(url, body, timeout=600)
            tokens = r["usage"]["completion_tokens"]
            err = None
        except Exception as e:  # recorded, not fatal: the report counts errors
            tokens, err = 0, str(e)
        with lock:
            out.append({"kind": kind, "latency": time.time() - t0, "tokens": tokens, "error": err, "end": time.time()})
        n += 1


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--max-requests", type=int, default=10_000)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    out, lock = [], threading.Lock()
    t0 = time.time()
    deadline = t0 + args.seconds
    threads = [threading.Thread(target=client, args=(args.url, "short", i, deadline, args, out, lock)) for i in range(args.short)]
    threads += [threading.Thread(target=client, args=(args.url, "long", 100 + i, deadline, args, out, lock)) for i in range(args.long)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    short = [r["latency"] for r in out if r["kind"] == "short" and not r["error"]]
    longs = [r for r in out if r["kind"] == "long" and not r["error"]]
    res = {
        "label": args.label,
        "clients_short": args.short,
        "clients_long": args.long,
        "seconds": round(elapsed, 1),
        "short_requests": len(short),
        "short_p50_s": round(pct(short, 50), 3) if short else None,
        "short_p99_s": round(pct(short, 99), 3) if short else None,
        "long_requests": len(longs),
        "long_mean_tokens": round(statistics.mean([r["tokens"] for r in longs]), 1) if longs else None,
        "tokens": sum(r["tokens"] for r in out),
        "aggregate_tok_s": round(sum(r["tokens"] for r in out) / elapsed, 1),
        "errors": sum(1 for r in out if r["error"]),
        "first_error": next((r["error"] for r in out if r["error"]), None),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
