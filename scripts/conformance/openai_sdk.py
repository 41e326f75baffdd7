#!/usr/bin/env python3
"""Drive `retort serve` with the official `openai` Python SDK and check what it parses.

Usage: openai_sdk.py BASE_URL MODEL
Exits non-zero on the first failed check; prints one line per check. Run by
crates/retort-server/tests/openai_sdk.rs against the tiny test model, and usable against any
retort server by hand.
"""
import sys

import openai


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "hello world"}]

    ids = [m.id for m in client.models.list().data]
    check("models.list", ids == [model], ids)

    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    c = r.choices[0]
    check("chat: plain", isinstance(c.message.content, str) and c.finish_reason in ("stop", "length"), r)
    check("chat: usage", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
    greedy = c.message.content

    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, n=3, seed=7, temperature=1.0)
    check("chat: n=3", [x.index for x in r.choices] == [0, 1, 2], r.choices)

    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=5, logprobs=True, top_logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs.content
    check("chat: logprobs", len(lp) >= 1 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp), lp)
    check("chat: greedy token is the top-1", all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in lp), lp)

    text, usage, finishes, roles = "", None, [], 0
    for ch in client.chat.completions.create(
        model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if ch.usage is not None:
            usage = ch.usage
            check("stream: the usage chunk has no choices", ch.choices == [], ch)
        for x in ch.choices:
            roles += x.delta.role == "assistant"
            text += x.delta.content or ""
            if x.finish_reason:
                finishes.append(x.finish_reason)
    check("stream: text equals the plain answer", text == greedy, (text, greedy))
    check("stream: one role, one finish", roles == 1 and len(finishes) == 1, (roles, finishes))
    check("stream: include_usage", usage is not None and usage.completion_tokens >= 1, usage)

    r = client.completions.create(model=model, prompt="hello world", max_tokens=5, temperature=0)
    check("completions: generation", isinstance(r.choices[0].text, str) and r.choices[0].finish_reason in ("stop", "length"), r)
    check("completions: usage", r.usage.prompt_tokens >= 1, r.usage)

    # lm-eval-harness's log-likelihood request: echo + logprobs, one generated token.
    r = client.completions.create(model=model, prompt="hello world the", max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    check("echo: prompt and generated tokens", len(lp.tokens) == n_prompt + 1, (lp.tokens, n_prompt))
    check("echo: first token has no log-prob", lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp)
    check("echo: log-probs", all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp.token_logprobs)
    check("echo: one alternative each", all(len(t) == 1 for t in lp.top_logprobs[1:]), lp.top_logprobs)
    check("echo: offsets increase", lp.text_offset == sorted(lp.text_offset), lp.text_offset)
    check("echo: text starts with the prompt", r.choices[0].text.startswith("hello world the"), r.choices[0].text)
    # lm-eval's greedy check: a token is greedy when its log-prob is the top alternative's.
    for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        check("echo: top-1 is at least the token's log-prob", max(top.values()) >= t - 1e-5, (t, top))

    plain = client.completions.create(model=model, prompt="hello world", max_tokens=6, temperature=0)
    text, usage, finishes = "", None, []
    for ch in client.completions.create(
        model=model, prompt="hello world", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if ch.usage is not None:
            usage = ch.usage
        for x in ch.choices:
            text += x.text
            if x.finish_reason:
                finishes.append(x.finish_reason)
    check("completions stream: text equals the plain answer", text == plain.choices[0].text, (text, plain.choices[0].text))
    check("completions stream: one finish and the usage", len(finishes) == 1 and usage is not None and usage.completion_tokens == plain.usage.completion_tokens, (finishes, usage))

    r = client.completions.create(model=model, prompt=["hello", "the world"], max_tokens=2, temperature=0)
    check("completions: a list of prompts", [x.index for x in r.choices] == [0, 1], r.choices)

    try:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=100_000_000)
        check("error: 400", False, "no error")
    except openai.BadRequestError as e:
        check("error: 400 is BadRequestError", e.status_code == 400 and "maximum context length" in str(e), e)
    try:
        client.chat.completions.create(model="nope", messages=msgs, max_tokens=2)
        check("error: 404", False, "no error")
    except openai.NotFoundError as e:
        check("error: 404 is NotFoundError", e.status_code == 404, e)
    print("all checks passed")


if __name__ == "__main__":
    main()
