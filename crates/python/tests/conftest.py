"""Shared fixtures: the real model, the CLI, and the tiny fixtures as servable directories.

scripts/test.sh sets GEMMA3_TEST_MODEL (the real 270M GGUF) and GEMMA3_BIN (the CLI built
by cargo); the fixtures come from ../shared beside the repository.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared"


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through scripts/test.sh")
    return value


@pytest.fixture(scope="session")
def model_path() -> str:
    return _require_env("GEMMA3_TEST_MODEL")


@pytest.fixture(scope="session")
def cli():
    """Runs the `gemma3` CLI; returns its stdout."""
    binary = _require_env("GEMMA3_BIN")

    def run(*args: str) -> str:
        out = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, f"gemma3 {' '.join(args)} failed: {out.stderr}"
        return out.stdout

    return run


@pytest.fixture(scope="session")
def model(model_path):
    """The real model, shared by the tests (two threads, as the suite's machine has)."""
    import gemma3

    return gemma3.Model(model_path, threads=2)


def read_safetensors(path: pathlib.Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    types = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        raw = data[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(raw, dtype=types[t["dtype"]]).reshape(t["shape"])
    return out


def _piece(i: int) -> str:
    return {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        108: "\n\n",
        510: "<start_of_image>",
        511: "<end_of_image>",
        512: "<image_soft_token>",
    }.get(i, f"<t{i}>")


def tiny_dir(fixture: str, dest: pathlib.Path, vocab: int) -> pathlib.Path:
    """A tiny fixture as a model directory: a tokenizer naming every id (`<tN>` pieces,
    so text reads as ids) and a chat template of its own."""
    src = SHARED / "fixtures" / fixture
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        (dest / f).write_bytes((src / f).read_bytes())
    pieces = [_piece(i) for i in range(vocab)]
    tokenizer = {
        "added_tokens": [
            {"id": i, "content": p, "special": i <= 2} for i, p in enumerate(pieces)
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "model": {"type": "BPE", "vocab": {p: i for i, p in enumerate(pieces)}, "merges": []},
    }
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>"})
    )
    (dest / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.content is string %}{{ m.content }}"
        "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<start_of_image>"
        "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    )
    return dest


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> pathlib.Path:
    return tiny_dir("tiny-text", tmp_path_factory.mktemp("tiny-text"), 512)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> pathlib.Path:
    return tiny_dir("tiny-vlm", tmp_path_factory.mktemp("tiny-vlm"), 600)


def ids_of(text: str) -> list:
    """The ids of `<tN>` text."""
    return [int(p) for p in text.replace(">", "").split("<t")[1:]]
