#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/ from the fixtures in ../shared.
Run from the repository root: python3 fuzz/make_seeds.py. Every seed stays well under
100 KB. (Images: the fixtures' PNGs plus BMP and GIF written here; no JPEG or WebP seed,
the fuzzer finds those formats from their magic numbers.)"""
import json, os, shutil, struct, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "..", "shared", "fixtures")
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- GGUF: the quantize fixture's metadata (tokenizer included) and tiny tensors ----------
def gguf_kv(path):
    """The key-value section of a GGUF file, as (key, type, raw value bytes) in order."""
    b = open(path, "rb").read(1 << 20)
    pos = 8
    _n_t, n_kv = struct.unpack_from("<QQ", b, pos)
    pos += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(ty, p):
        if ty in sizes:
            return p + sizes[ty]
        if ty == 8:
            (n,) = struct.unpack_from("<Q", b, p)
            return p + 8 + n
        (ety, n) = struct.unpack_from("<IQ", b, p)
        p += 12
        for _ in range(n):
            p = skip(ety, p)
        return p

    out = []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", b, pos)
        key = b[pos + 8 : pos + 8 + n]
        pos += 8 + n
        (ty,) = struct.unpack_from("<I", b, pos)
        pos += 4
        end = skip(ty, pos)
        out.append((key, ty, b[pos:end]))
        pos = end
    return out


def gguf(kv, tensors):
    """A GGUF v3 file: kv as from gguf_kv, tensors as (name, dims, ggml type, data)."""
    s = lambda t: struct.pack("<Q", len(t)) + t
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, ty, raw in kv:
        out += s(key) + struct.pack("<I", ty) + raw
    offset = 0
    blobs = b""
    for name, dims, ty, data in tensors:
        out += s(name.encode()) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        pad = (-len(data)) % 32
        blobs += data + b"\0" * pad
        offset += len(data) + pad
    out += b"\0" * ((-len(out)) % 32)
    return out + blobs


def pattern(n):
    return bytes((i * 37 + 11) % 251 for i in range(n))


# ggml types: name -> (id, block elements, block bytes)
TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
         "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144),
         "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}


def tiny_tensors():
    out = []
    for name, (ty, be, bb) in TYPES.items():
        cols, rows = be * (1 if be > 1 else 8), 2
        out.append((f"t.{name.lower()}", [cols, rows], ty, pattern(cols // be * bb * rows)))
    return out


kv = gguf_kv(os.path.join(FIX, "quantize", "model-Q8_0.gguf"))
put("gguf", "fixture-metadata.gguf", gguf(kv, tiny_tensors()))
small_kv = [k for k in kv if not k[0].startswith(b"tokenizer.")]
put("gguf", "no-tokenizer.gguf", gguf(small_kv, tiny_tensors()[:3]))
put("gguf", "empty.gguf", gguf([], []))

# ---- safetensors + config.json + index ----------------------------------------------------
def safetensors(tensors):
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "three.safetensors", safetensors([
    ("model.embed_tokens.weight", "F32", [4, 8], pattern(128)),
    ("model.norm.weight", "BF16", [8], pattern(16)),
    ("lm_head.weight", "F16", [2, 8], pattern(32)),
]))
put("safetensors", "scalar.safetensors", safetensors([("x", "F32", [], pattern(4))]))
for rel, name in [("tiny-text/config.json", "config.json"), ("tiny-text/config.legacy.json", "config.legacy.json"),
                  ("tiny-vlm/config.json", "config-vlm.json"), ("quantize/hf/config.json", "config-quantize.json")]:
    put("safetensors", name, open(os.path.join(FIX, rel), "rb").read())
put("safetensors", "index.json", json.dumps({"metadata": {"total_size": 176}, "weight_map": {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    "model.norm.weight": "model-00002-of-00002.safetensors"}}))

# ---- tokenizer.json (+ NUL + tokenizer_config.json) -----------------------------------------
hf = os.path.join(FIX, "quantize", "hf")
tj = open(os.path.join(hf, "tokenizer.json"), "rb").read()
put("tokenizer_json", "fixture.json", tj + b"\0" + open(os.path.join(hf, "tokenizer_config.json"), "rb").read())
put("tokenizer_json", "fixture-no-config.json", tj)
put("tokenizer_json", "merges.json", json.dumps({
    "added_tokens": [{"id": 0, "content": "<bos>", "special": True}, {"id": 1, "content": "<eos>", "special": True}],
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                   {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}},
    "post_processor": {"single": [{"SpecialToken": {"id": "<bos>"}}]},
    "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": {
        "<bos>": 0, "<eos>": 1, "<unk>": 2, "<0x41>": 3, "\u2581": 4, "a": 5, "b": 6, "ab": 7, "\u2581ab": 8},
        "merges": ["a b", ["\u2581", "ab"]]}}))

# ---- tokenize: mode byte (bit 0 tokenizer, bit 1 ids, bit 2 BOS / raw ids, bit 3 specials) -----
for i, text in enumerate(["Hello world, this is a test.",
                          "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
                          "  tabs\t\tand\n\n\nnewlines <b>bold</b> é 🦀 𓀀 \u0000\u007f",
                          "<start_of_image><unused12>[multimodal]<bos>"]):
    for mode in (0, 1, 12, 13):
        put("tokenize", f"text{i}-mode{mode}", bytes([mode]) + text.encode())
put("tokenize", "ids-spm", bytes([2]) + bytes(range(0, 255, 3)))
put("tokenize", "ids-bpe", bytes([11]) + bytes(range(255, 0, -5)))

# ---- image: the fixtures' PNGs, and the same pixels as JPEG, WebP, GIF and BMP -------------
vlm = os.path.join(FIX, "tiny-vlm")
for name in ["image.png", "image_90x71.png"]:
    put("image", name, open(os.path.join(vlm, name), "rb").read())


def bmp(w, h):
    """A 24-bit BMP of a colour gradient (rows bottom-up, padded to 4 bytes)."""
    row = lambda y: bytes(c for x in range(w) for c in ((x * 255) // w, (y * 255) // h, 128)) + b"\0" * ((-3 * w) % 4)
    pixels = b"".join(row(y) for y in range(h))
    head = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(head) + len(pixels), 0, 0, 14 + len(head)) + head + pixels


def gif(w, h):
    """A GIF with a 4-colour palette whose LZW stream sends a clear code before every
    pixel, so it needs no compressor (codes stay 3 bits wide)."""
    codes = []
    for i in range(w * h):
        codes += [4, (i // w + i % w) % 4]
    codes.append(5)
    bits, n, out = 0, 0, bytearray()
    for c in codes:
        bits |= c << n
        n += 3
        while n >= 8:
            out.append(bits & 255)
            bits >>= 8
            n -= 8
    if n:
        out.append(bits & 255)
    blocks = b"".join(bytes([len(out[i:i + 255])]) + bytes(out[i:i + 255]) for i in range(0, len(out), 255))
    palette = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x81, 0, 0) + palette
            + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + bytes([2]) + blocks + b"\0;")


put("image", "gradient-240x80.bmp", bmp(240, 80))
put("image", "tall-20x64.bmp", bmp(20, 64))
put("image", "diagonal-16x12.gif", gif(16, 12))

# ---- eval_items: first byte = task index (Task::ALL order) + 16 × shots ---------------------
tasks = ["hellaswag", "piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "lambada_openai"]
ev = os.path.join(ROOT, "..", "shared", "evals", "quick")
for i, t in enumerate(tasks):
    lines = open(os.path.join(ev, t + ".jsonl"), "rb").read().splitlines()[:3]
    put("eval_items", t, bytes([i + 16 * 2]) + b"\n".join(lines) + b"\n")

# ---- server_request -------------------------------------------------------------------------
png = open(os.path.join(vlm, "image.png"), "rb").read()
import base64
put("server_request", "chat.json", json.dumps({
    "model": "gemma3", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "stop": ["\n", "END"], "n": 2,
    "seed": 1, "logprobs": True, "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}}))
put("server_request", "chat-image.json", json.dumps({"messages": [{"role": "user", "content": [
    {"type": "text", "text": "What is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}],
    "response_format": {"type": "text"}, "tools": [], "repeat_penalty": 1.1, "min_p": 0.05}))
put("server_request", "completion.json", json.dumps({"prompt": ["Once upon", "a time"], "max_tokens": 8,
    "echo": True, "logprobs": 2, "suffix": None, "best_of": 1, "presence_penalty": 0.5, "frequency_penalty": 0.1}))
put("server_request", "completion-ids.json", json.dumps({"prompt": [[2, 100, 200], [2, 7]], "stop": "x", "ignore_eos": True}))

# ---- chat_template: template, NUL, messages -------------------------------------------------
msgs = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": "data:,"}]}])
gemma_like = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{% set r = 'model' %}"
              "{% else %}{% set r = m.role %}{% endif %}<start_of_turn>{{ r }}\n"
              "{% if m.content is string %}{{ m.content | trim }}{% else %}{% for p in m.content %}"
              "{% if p.type == 'image' %}<start_of_image>{% else %}{{ p.text | trim }}{% endif %}{% endfor %}"
              "{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
put("chat_template", "gemma-like", gemma_like.encode() + b"\0" + msgs.encode())
put("chat_template", "loops", b"{% for i in range(100) %}{% for m in messages %}{{ m.content | tojson }}{{ loop.index }}"
    b"{% endfor %}{% endfor %}{{ raise_exception('no') if messages|length > 9 }}{{ strftime_now('%Y') }}"
    b"{{ 'a b'.split(' ') | join(',') }}{{ ' x '.strip().upper() }}" + b"\0" + msgs.encode())
put("chat_template", "macro", b"{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ n }}{% endif %}{% endmacro %}{{ f(5) }}"
    b"{% set ns = namespace(x=0) %}{% for m in messages[1:] %}{% set ns.x = ns.x + 1 %}{% endfor %}{{ ns.x }}")
print("seeds written to", SEEDS)
