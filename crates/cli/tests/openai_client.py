"""Checks `gemma3 serve` with the official `openai` Python client (run by tests/serve.rs).

Chat non-streaming and streaming give the same text; completions with logprobs; models;
tokenize <-> detokenize; the same seed at temperature 1 gives the same text twice; an
image_url data URL on the tiny-vlm fixture gives what `gemma3 generate --image` gives.
"""

import argparse
import base64
import json
import sys
import urllib.request

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def post(base, path, body):
    req = urllib.request.Request(
        base.removesuffix("/v1") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--vlm-base", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--vlm-prompt", required=True)
    ap.add_argument("--vlm-expected", required=True)
    a = ap.parse_args()

    client = openai.OpenAI(base_url=a.base, api_key="none")
    model = client.models.list().data[0].id
    check(model.startswith("gemma"), f"models lists {model}")

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    check(whole.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")
    check(whole.usage.completion_tokens > 0, "chat usage")
    pieces = []
    finish = None
    usage = None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(pieces) == text, f"streamed chat equals the whole one ({text!r})")
    check(finish == whole.choices[0].finish_reason, "streamed finish_reason")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens, "stream usage")

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                     temperature=0, logprobs=3)
    lp = comp.choices[0].logprobs
    check(len(lp.tokens) == 5 and len(lp.token_logprobs) == 5, "completion logprobs per token")
    check(all(x <= 0 for x in lp.token_logprobs), "logprobs are log-probabilities")
    check(all(len(t) == 3 for t in lp.top_logprobs), "three alternatives per token")
    check("".join(lp.tokens) == comp.choices[0].text, "logprob tokens spell the text")
    # Greedy: each chosen token is the most likely alternative.
    check(all(abs(max(t.values()) - x) < 1e-4 for t, x in zip(lp.top_logprobs, lp.token_logprobs)),
          "greedy tokens are the top alternatives")
    echo = client.completions.create(model=model, prompt="The capital of France is", max_tokens=0,
                                     echo=True, logprobs=1)
    e = echo.choices[0]
    check(e.text == "The capital of France is", "echo with max_tokens 0 returns the prompt")
    check(e.logprobs.token_logprobs[1] is not None and e.logprobs.token_logprobs[0] is None,
          "echo scores the prompt's tokens")

    chat_lp = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                             temperature=0, logprobs=True, top_logprobs=2)
    content = chat_lp.choices[0].logprobs.content
    check(len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content), "chat logprobs")

    tok = post(a.base, "/tokenize", {"content": "Hello, world! Ünïcödé 🙂"})
    back = post(a.base, "/detokenize", {"tokens": tok["tokens"]})
    check(back["content"].endswith("Hello, world! Ünïcödé 🙂"), "tokenize/detokenize round trip")
    check(tok["count"] == len(tok["tokens"]), "tokenize count")

    sampled = [
        client.completions.create(model=model, prompt="Once upon a time", max_tokens=16,
                                  temperature=1.0, seed=1234).choices[0].text
        for _ in range(2)
    ]
    check(sampled[0] == sampled[1], "the same seed gives the same text")
    other = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16,
                                      temperature=1.0, seed=99).choices[0].text
    check(other != sampled[0], "another seed gives another text")

    n = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                  temperature=1.0, seed=5, n=3)
    check(len(n.choices) == 3 and sorted(c.index for c in n.choices) == [0, 1, 2], "n choices")

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100000)
        check(False, "an oversized max_tokens is refused")
    except openai.BadRequestError as err:
        check("max_tokens" in str(err), "an oversized max_tokens is a 400 naming it")

    vlm = openai.OpenAI(base_url=a.vlm_base, api_key="none")
    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    r = vlm.chat.completions.create(
        model="tiny-vlm", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": a.vlm_prompt},
        ]}],
    )
    got = r.choices[0].message.content
    check(got == a.vlm_expected, f"image chat equals gemma3 generate --image ({got!r} vs {a.vlm_expected!r})")
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
