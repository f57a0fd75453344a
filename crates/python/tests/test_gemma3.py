"""`import gemma3` against the fixtures, the CLI and OpenAI's client types."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import _thread

import numpy as np
import pytest

import gemma3
from conftest import SHARED, ids_of, read_safetensors

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
IMAGE = SHARED / "fixtures" / "tiny-vlm" / "image.png"


# -- numerics: the fixtures and the CLI ---------------------------------------------------


def test_logits_equal_the_transformers_fixture(tiny_text):
    expected = read_safetensors(SHARED / "fixtures" / "tiny-text" / "expected.safetensors")
    m = gemma3.Model(tiny_text, exact=True)
    for ids_key, logits_key in (("input_ids", "logits"), ("full_ids", "full_logits")):
        ids = [int(i) for i in expected[ids_key]]
        got = m.logits(ids)
        assert got.dtype == np.float32 and got.shape == expected[logits_key].shape
        assert np.abs(got - expected[logits_key]).max() < 1e-4, logits_key


def test_greedy_completion_equals_the_fixture_generation(tiny_text):
    expected = read_safetensors(SHARED / "fixtures" / "tiny-text" / "expected.safetensors")
    m = gemma3.Model(tiny_text, exact=True)
    want = [int(i) for i in expected["generated_ids"]]
    r = m.create_completion(
        [int(i) for i in expected["input_ids"]], max_tokens=len(want), temperature=0,
        ignore_eos=True,
    )
    assert ids_of(r["choices"][0]["text"]) == want


def test_logits_equal_the_cli(model_path, cli):
    m = gemma3.Model(model_path, exact=True)
    ids = [2, 818, 5279, 529, 7001, 563]
    doc = json.loads(cli("logits", "-m", model_path, "--ids", ",".join(map(str, ids)),
                         "--top-k", "10"))
    got = m.logits(ids)
    assert got.shape == (len(ids), 262144)
    for row, pos in zip(got, doc["positions"]):
        top = [i for i, _ in pos["top"]]
        assert list(np.argsort(-row, kind="stable")[:10]) == top
        # The same code computed both: the same float32 values, to the bit.
        assert [row[i] for i in top] == [np.float32(v) for _, v in pos["top"]]


def test_tokenize_equals_the_cli(model, model_path, cli):
    for text in ["Hello world, <start_of_turn>user", "  spaces\tand\nlines ✓ 你好"]:
        doc = json.loads(cli("tokenize", "-m", model_path, "--json", text))
        assert model.tokenize(text) == doc["ids"]
        assert model.detokenize(model.tokenize(text, add_bos=False)) == text
    assert model.tokenize("a", add_bos=False) == model.tokenize("a")[1:]


def test_greedy_generate_equals_the_cli(model, model_path, cli):
    for p in PROMPTS:
        want = cli("generate", "-m", model_path, "--greedy", "-n", "32", p)
        # The CLI ends its output with a newline.
        assert model.generate(p, max_tokens=32, temperature=0) + "\n" == want


def test_a_draft_model_changes_no_token(model, model_path, tiny_text):
    drafted = gemma3.Model(model_path, draft=model_path, parallel=2)
    for p in PROMPTS[:3]:
        for seed in (None, 3):
            kw = dict(max_tokens=24, temperature=0) if seed is None else dict(
                max_tokens=24, temperature=1.0, seed=seed)
            assert drafted.generate(p, **kw) == model.generate(p, **kw)
    with pytest.raises(gemma3.BadRequestError, match="cannot draft"):
        gemma3.Model(model_path, draft=str(tiny_text))


def test_stream_pieces_join_to_generate(model):
    for p in PROMPTS:
        pieces = list(model.stream(p, max_tokens=40, temperature=0))
        assert len(pieces) > 1
        assert "".join(pieces) == model.generate(p, max_tokens=40, temperature=0)
    seeded = dict(max_tokens=40, temperature=1.0, seed=7)
    assert "".join(model.stream(PROMPTS[0], **seeded)) == model.generate(PROMPTS[0], **seeded)


def test_an_image_prompt_equals_the_cli_and_the_fixture(tiny_vlm, cli):
    m = gemma3.Model(tiny_vlm, exact=True)
    prompt = "<t223><t109><t178><t286><t64><start_of_image><t201><t328><t20><t311><t364><t436><t45><t62>"
    expected = read_safetensors(SHARED / "fixtures" / "tiny-vlm" / "expected.safetensors")
    for image in (str(IMAGE), IMAGE.read_bytes()):
        got = m.logits(prompt=prompt, images=[image])
        assert np.abs(got - expected["logits"]).max() < 1e-4
    doc = json.loads(cli("logits", "-m", str(tiny_vlm), "--prompt", prompt, "--image",
                         str(IMAGE), "--top-k", "5"))
    for row, pos in zip(got, doc["positions"]):
        assert [row[i] for i, _ in pos["top"]] == [np.float32(v) for _, v in pos["top"]]
    want = cli("generate", "-m", str(tiny_vlm), "--image", str(IMAGE), "--greedy",
               "--ignore-eos", "-n", "8", prompt)
    text = m.generate(prompt, images=[IMAGE.read_bytes()], max_tokens=8, temperature=0)
    assert text == want.strip()
    assert ids_of(text) == [int(i) for i in expected["generated_ids"]]


def test_pil_images_and_pipelines(tiny_vlm):
    PIL = pytest.importorskip("PIL.Image")
    m = gemma3.Model(tiny_vlm)
    prompt = "<t223><t109><start_of_image><t201>"
    by_path = m.generate(prompt, images=[str(IMAGE)], max_tokens=6, temperature=0)
    assert m.generate(prompt, images=[PIL.open(IMAGE)], max_tokens=6, temperature=0) == by_path
    pipe = gemma3.pipeline("image-text-to-text", model=m)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "<t223><t109>"},
        {"type": "image", "path": str(IMAGE)},
        {"type": "text", "text": "<t201>"},
    ]}]
    out = pipe(text=messages, max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"][:-1] == messages
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"] == by_path
    for key in ("url", "image"):
        other = [{"role": "user", "content": [
            {"type": "text", "text": "<t223><t109>"},
            {"type": "image", key: ("data:image/png;base64," + __import__("base64").b64encode(
                IMAGE.read_bytes()).decode()) if key == "url" else PIL.open(IMAGE)},
            {"type": "text", "text": "<t201>"},
        ]}]
        assert pipe(text=other, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1] == answer


def test_text_generation_pipeline(model):
    pipe = gemma3.pipeline("text-generation", model=model)
    p = PROMPTS[0]
    out = pipe(p, max_new_tokens=12, do_sample=False)
    assert out == [{"generated_text": p + model.generate(p, max_tokens=12, temperature=0)}]
    short = pipe(p, max_new_tokens=12, do_sample=False, return_full_text=False)
    assert short[0]["generated_text"] == out[0]["generated_text"][len(p):]
    chat = [{"role": "user", "content": "Name a colour."}]
    out = pipe(chat, max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"][0] == chat[0]
    assert out[0]["generated_text"][1]["role"] == "assistant"
    with pytest.raises(gemma3.BadRequestError, match="unknown task"):
        gemma3.pipeline("translation", model=model)


# -- OpenAI's shapes ------------------------------------------------------------------


def test_chat_completions_validate_as_openai_types(model):
    types = pytest.importorskip("openai.types.chat")
    messages = [{"role": "user", "content": "Write one word."}]
    r = model.create_chat_completion(messages, max_tokens=8, temperature=0,
                                     logprobs=True, top_logprobs=2, n=2)
    types.ChatCompletion.model_validate(r)
    assert r["object"] == "chat.completion" and len(r["choices"]) == 2
    chunks = list(model.create_chat_completion(
        messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    for c in chunks:
        types.ChatCompletionChunk.model_validate(c)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == r["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == r["usage"]["completion_tokens"] // 2
    completions = pytest.importorskip("openai.types")
    c = model.create_completion(PROMPTS[0], max_tokens=8, temperature=0)
    completions.Completion.model_validate(c)
    assert c["choices"][0]["text"] == model.generate(PROMPTS[0], max_tokens=8, temperature=0)


def test_json_schema_and_tools_as_the_server(model):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    text = model.generate("A person: ", json_schema=schema, max_tokens=64, temperature=0)
    jsonschema.validate(json.loads(text), schema)
    r = model.create_chat_completion(
        [{"role": "user", "content": "Make a person."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)
    assert model.generate("Digits: ", regex="[0-9]{5}", max_tokens=16, temperature=0).isdigit()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = model.create_chat_completion(
        [{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice="required", parallel_tool_calls=False, max_tokens=256, temperature=0)
    types = pytest.importorskip("openai.types.chat")
    types.ChatCompletion.model_validate(r)
    call = r["choices"][0]["message"]["tool_calls"][0]
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    assert call["function"]["name"] == "get_weather"
    assert "city" in json.loads(call["function"]["arguments"])
    streamed = list(model.create_chat_completion(
        [{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice="required", parallel_tool_calls=False, max_tokens=256, temperature=0,
        stream=True))
    for c in streamed:
        types.ChatCompletionChunk.model_validate(c)
    args = "".join(tc["function"].get("arguments", "") for c in streamed if c["choices"]
                   for tc in c["choices"][0]["delta"].get("tool_calls") or [])
    assert args == call["function"]["arguments"]


def test_apply_chat_template_and_info(model):
    text = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n" in text
    info = model.info()
    assert info["layers"] == 18 and info["vocab_size"] == 262144
    assert info["context"] == model.context > 0 and info["vision"] is None


# -- threads, the GIL, Ctrl-C ---------------------------------------------------------


def test_eight_threads_get_their_solo_results(model):
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)][:8]
    kinds = [dict(temperature=0), dict(temperature=1.0, seed=11)]
    solo = {(p, i): model.generate(p, max_tokens=24, **k)
            for p in prompts for i, k in enumerate(kinds)}
    results = {}

    def run(p, i):
        results[(p, i)] = model.generate(p, max_tokens=24, **kinds[i])

    threads = [threading.Thread(target=run, args=(p, i)) for p in prompts for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_the_gil_is_free_during_generation(model):
    count = 0
    stop = False

    def counter():
        nonlocal count
        while not stop:
            count += 1

    t = threading.Thread(target=counter)
    t.start()
    try:
        before = count
        t0 = time.time()
        model.generate(PROMPTS[2], max_tokens=64, temperature=0)
        took = time.time() - t0
        during = count - before
    finally:
        stop = True
        t.join()
    # A Python thread holding no GIL-free time would count almost nothing while the
    # engine computes; it counts hundreds of thousands per second when it runs.
    assert during > 10_000 * took, (during, took)


def test_ctrl_c_stops_a_generation(model):
    # Python's own Ctrl-C handler, whatever this process inherited: a suite started in the
    # background (`cmd &` in a script) begins with SIGINT ignored, and then interrupt_main()
    # does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_stops_a_generation(model)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_stops_a_generation(model):
    timer = threading.Timer(0.5, _thread.interrupt_main)
    t0 = time.time()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        model.generate(PROMPTS[2], max_tokens=4000, temperature=1.0, seed=1)
    assert time.time() - t0 < 5
    timer.join()
    # The model still answers, and the interrupted request left no slot behind.
    assert model.generate(PROMPTS[0], max_tokens=4, temperature=0)
    stream = model.stream(PROMPTS[2], max_tokens=4000, temperature=1.0, seed=1)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    timer.join()


def test_asyncio(model):
    async def main():
        want = model.generate(PROMPTS[0], max_tokens=16, temperature=0)
        got = await asyncio.gather(*[model.agenerate(PROMPTS[0], max_tokens=16, temperature=0)
                                     for _ in range(4)])
        assert got == [want] * 4
        pieces = [p async for p in model.astream(PROMPTS[0], max_tokens=16, temperature=0)]
        assert "".join(pieces) == want
        r = await model.acreate_chat_completion([{"role": "user", "content": "Hi"}],
                                                max_tokens=4, temperature=0)
        assert r["object"] == "chat.completion"
        chunks = [c async for c in await model.acreate_chat_completion(
            [{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True)]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    asyncio.run(main())


# -- errors ---------------------------------------------------------------------------


def test_every_error_class(model, model_path, tmp_path):
    assert issubclass(gemma3.ContextOverflowError, gemma3.BadRequestError)
    for cls in (gemma3.ModelNotFoundError, gemma3.BadRequestError, gemma3.UnavailableError,
                gemma3.GenerationError):
        assert issubclass(cls, gemma3.Error)
    with pytest.raises(gemma3.ModelNotFoundError):
        gemma3.Model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(open(model_path, "rb").read(4096))
    with pytest.raises(gemma3.Error, match="truncated|beyond|end of"):
        gemma3.Model(str(bad))
    with pytest.raises(gemma3.BadRequestError, match="temperature"):
        model.generate("x", temperature=-1)
    with pytest.raises(gemma3.BadRequestError):
        model.generate("x", json_schema={"type": "object", "not": {"required": ["a"]}})
    with pytest.raises(gemma3.BadRequestError, match="image"):
        model.generate("x", images=[b"not an image"])
    with pytest.raises(gemma3.BadRequestError):
        model.create_chat_completion([{"role": "wizard", "content": "x"}])
    with pytest.raises(gemma3.BadRequestError, match="vocabulary"):
        model.detokenize([10**7])
    with pytest.raises(gemma3.ModelNotFoundError, match="draft"):
        gemma3.Model(model_path, draft=str(tmp_path / "other.gguf"))
    small = gemma3.Model(model_path, ctx_size=64, parallel=1, max_queue=1)
    with pytest.raises(gemma3.ContextOverflowError, match="context"):
        small.generate("word " * 100, max_tokens=8)
    # One running, one waiting: a third request finds the queue full.
    running = small.stream(PROMPTS[0], max_tokens=40, temperature=0)
    next(running)
    waiting = small.stream(PROMPTS[0], max_tokens=40, temperature=0)
    with pytest.raises(gemma3.UnavailableError, match="busy"):
        small.generate(PROMPTS[0], max_tokens=4)
    running.close()
    waiting.close()
    # Their slots free at the scheduler's next step.
    deadline = time.time() + 10
    while True:
        try:
            assert small.generate(PROMPTS[0], max_tokens=4, temperature=0)
            break
        except gemma3.UnavailableError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_bad_grammar_is_an_error_not_a_panic(model):
    with pytest.raises(gemma3.BadRequestError, match="grammar"):
        model.generate("x", grammar="start: (")
    with pytest.raises(gemma3.BadRequestError):
        model.create_chat_completion([{"role": "user", "content": "x"}], n=10**9)


# -- packaging ------------------------------------------------------------------------


def test_import_is_quick():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import gemma3"],
        capture_output=True, text=True, check=True,
    )
    assert "gemma3._gemma3" in out.stderr


@pytest.mark.skipif(not os.environ.get("GEMMA3_TEST_WHEEL"), reason="GEMMA3_TEST_WHEEL is not set")
def test_the_wheel_installs_in_a_fresh_venv(tmp_path):
    wheel = os.environ["GEMMA3_TEST_WHEEL"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    wheel], check=True, timeout=600)
    out = subprocess.run([str(py), "-c", "import gemma3, numpy; print(gemma3.__version__, "
                          "gemma3.Model.__doc__ is not None)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == [gemma3.__version__, "True"]
