"""Gemma 3 in-process, from gemma3's pure-Rust engine.

    >>> import gemma3
    >>> model = gemma3.Model()                      # the default model; or a path,
    >>> model.generate("The capital of France is", max_tokens=8, temperature=0)
    >>> for piece in model.stream("Once upon a time"):
    ...     print(piece, end="", flush=True)
    >>> model.create_chat_completion([{"role": "user", "content": "Hi"}])   # OpenAI's dict
    >>> pipe = gemma3.pipeline("text-generation", model="google/gemma-3-270m-it")

`Model` takes what `gemma3 --model` takes: a GGUF file, a Hugging Face directory or repo
id (from the hub cache, else downloaded), an Ollama name, or None for the default model.
Generation runs with the GIL released; threads (and asyncio tasks) that share one `Model`
are decoded together in the same batches. Ctrl-C stops a generation between tokens.
Errors are `gemma3.Error` and its subclasses, with the engine's message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from typing import (
    Any,
    AsyncIterator,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Union,
)

from . import _gemma3
from ._gemma3 import (
    BadRequestError,
    ContextOverflowError,
    Error,
    GenerationError,
    ModelNotFoundError,
    UnavailableError,
)

__version__: str = _gemma3.__version__

__all__ = [
    "Model",
    "Pipeline",
    "pipeline",
    "Error",
    "ModelNotFoundError",
    "BadRequestError",
    "ContextOverflowError",
    "UnavailableError",
    "GenerationError",
]

#: What an image may be given as: a path, encoded bytes, or a PIL image.
ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, Any]
Message = Dict[str, Any]

#: New tokens `generate` and `stream` make unless told (as `gemma3 generate`).
DEFAULT_MAX_TOKENS = 256


def _image_bytes(image: ImageLike) -> bytes:
    """Encoded image bytes from a path, bytes, or a PIL image."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadRequestError(f"cannot read the image {os.fspath(image)!r}: {e}") from None
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise BadRequestError(
        f"an image must be a path, bytes or a PIL image, not {type(image).__name__}"
    )


def _data_url(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


def _image_url(image: Any) -> str:
    """A URL the engine reads: http(s) and data URLs as they are, anything else as bytes."""
    if isinstance(image, str) and image.split(":", 1)[0].lower() in ("http", "https", "data"):
        return image
    return _data_url(_image_bytes(image))


def _part(part: Any) -> Any:
    """A message part in OpenAI's shape; transformers' `{"type": "image", ...}` parts
    (with `url`, `path` or `image`) become `image_url` parts."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "image":
        for key in ("url", "path", "image"):
            if part.get(key) is not None:
                return {"type": "image_url", "image_url": {"url": _image_url(part[key])}}
        raise BadRequestError('an image part needs "url", "path" or "image"')
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        return {"type": "image_url", "image_url": {"url": _image_url(url)}}
    return part


def _messages(messages: Sequence[Message]) -> List[Message]:
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequestError("each message must be a dict with a role and content")
        content = m.get("content")
        if isinstance(content, list):
            m = dict(m, content=[_part(p) for p in content])
        out.append(m)
    return out


def _request(**fields: Any) -> Dict[str, Any]:
    """The request body: fields left as None are left out (the model's defaults apply)."""
    return {k: v for k, v in fields.items() if v is not None}


def _constraint(
    json_schema: Optional[Dict[str, Any]], grammar: Optional[str], regex: Optional[str]
) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if json_schema is not None:
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": json_schema},
        }
    if grammar is not None:
        out["grammar"] = grammar
    if regex is not None:
        out["regex"] = regex
    return out


def _chunk(text: str) -> Dict[str, Any]:
    chunk = json.loads(text)
    if "error" in chunk and "choices" not in chunk:
        raise GenerationError(chunk["error"].get("message", "generation failed"))
    return chunk


class _Chunks:
    """A reply's stream chunks as dicts; closing (or leaving) it cancels the request."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __iter__(self) -> "_Chunks":
        return self

    def __next__(self) -> Dict[str, Any]:
        try:
            text = self._handle.next_chunk()
        except BaseException:
            self._handle.cancel()
            raise
        if text is None:
            raise StopIteration
        return _chunk(text)

    def close(self) -> None:
        self._handle.cancel()

    def __del__(self) -> None:
        self._handle.cancel()


class Model:
    """A Gemma 3 model in this process.

    Args:
        model: a GGUF file, a Hugging Face directory or repo id, an Ollama name; None for
            the default model (fetched once, as `gemma3` does).
        mmproj: the vision tower's GGUF (found beside the model when left out).
        ctx_size: tokens of context per sequence (default: the model's trained length,
            capped by the memory available).
        threads: compute threads (default: one per core). One pool serves the process:
            the first model sets it.
        cache_type: KV cache type, "f32", "f16", "bf16" or "q8_0".
        quantize: quantize the weights at load ("Q4_K_M", "Q8_0", ...).
        draft: a draft model for speculative decoding instead of prompt lookup (any form
            `model` takes, with the same vocabulary: the 270M for a 4B-27B).
        parallel: sequences decoded together (threads beyond it wait their turn).
        max_queue: requests that may wait for a turn; beyond it `UnavailableError`.
        speculative: speculative decoding, by prompt lookup or `draft` (the output is the
            same either way).
        exact: compute in float32 throughout, as the reference does (slower).
        chat_template: a Jinja chat template to use instead of the model's own.
    """

    def __init__(
        self,
        model: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        mmproj: Optional[Union[str, "os.PathLike[str]"]] = None,
        ctx_size: Optional[int] = None,
        threads: Optional[int] = None,
        cache_type: Optional[str] = None,
        quantize: Optional[str] = None,
        draft: Optional[str] = None,
        parallel: int = 16,
        max_queue: int = 256,
        speculative: bool = True,
        exact: bool = False,
        chat_template: Optional[str] = None,
    ) -> None:
        self._engine = _gemma3.Engine(
            None if model is None else os.fspath(model),
            mmproj=None if mmproj is None else os.fspath(mmproj),
            ctx_size=ctx_size,
            threads=threads,
            cache_type=cache_type,
            quantize=quantize,
            exact=exact,
            chat_template=chat_template,
            parallel=parallel,
            max_queue=max_queue,
            speculative=speculative,
            draft=None if draft is None else os.fspath(draft),
        )

    # -- facts and tokens -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The model's name (its file's, without the extension)."""
        return self._engine.name

    @property
    def context(self) -> int:
        """Tokens of context each sequence has."""
        return self._engine.context

    def info(self) -> Dict[str, Any]:
        """What `gemma3 info` shows: file, shape, context, cache type, kernels, vision."""
        return json.loads(self._engine.info())

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        """Token ids of `text` (`special`: control tokens such as <start_of_turn> are read
        as tokens, not text)."""
        return self._engine.tokenize(text, add_bos, special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of token ids."""
        return self._engine.detokenize(list(ids), skip_special)

    def logits(
        self,
        ids: Optional[Sequence[int]] = None,
        *,
        prompt: Optional[str] = None,
        images: Optional[Sequence[ImageLike]] = None,
    ) -> Any:
        """Every position's logits as a float32 numpy array (positions × vocabulary), for
        token ids or for a text prompt (with images at its <start_of_image> markers)."""
        return self._engine.logits(
            None if ids is None else list(ids),
            prompt,
            [_image_bytes(i) for i in images or []],
        )

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str:
        """`messages` in the model's chat template, as the model reads them."""
        return self._engine.apply_chat_template(
            json.dumps(_messages(messages)), add_generation_prompt
        )

    # -- plain text -------------------------------------------------------------------

    def _completion(
        self,
        prompt: str,
        stream: bool,
        images: Optional[Sequence[ImageLike]],
        max_tokens: Optional[int],
        json_schema: Optional[Dict[str, Any]],
        grammar: Optional[str],
        regex: Optional[str],
        sampling: Dict[str, Any],
    ) -> Any:
        if not isinstance(prompt, str):
            raise BadRequestError("the prompt must be a string")
        body = _request(
            prompt=prompt,
            stream=stream,
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            **sampling,
        )
        body.update(_constraint(json_schema, grammar, regex))
        return self._engine.submit(
            "completion", json.dumps(body), [_image_bytes(i) for i in images or []]
        )

    def _completion_kw(self, prompt: str, stream: bool, kwargs: Dict[str, Any]) -> Any:
        """`_completion` from `generate`'s keyword arguments (the asyncio forms)."""
        return self._completion(
            prompt, stream, kwargs.pop("images", None), kwargs.pop("max_tokens", None),
            kwargs.pop("json_schema", None), kwargs.pop("grammar", None),
            kwargs.pop("regex", None), _sampling(**kwargs),
        )

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        images: Optional[Sequence[ImageLike]] = None,
        json_schema: Optional[Dict[str, Any]] = None,
        grammar: Optional[str] = None,
        regex: Optional[str] = None,
    ) -> str:
        """The text that follows `prompt` (raw text: no chat template).

        Sampling left out follows the model's own defaults (its generation_config);
        `temperature=0` is greedy. `images` are shown at the prompt's <start_of_image>
        markers (in front when it has none). `json_schema`, `grammar` (Lark) or `regex`
        constrain the output. Stops at end of text, a `stop` string or `max_tokens`
        (default 256).
        """
        handle = self._completion(
            prompt, False, images, max_tokens, json_schema, grammar, regex,
            _sampling(temperature, top_k, top_p, min_p, presence_penalty,
                      frequency_penalty, repetition_penalty, seed, stop),
        )
        return json.loads(handle.result())["choices"][0]["text"]

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        images: Optional[Sequence[ImageLike]] = None,
        json_schema: Optional[Dict[str, Any]] = None,
        grammar: Optional[str] = None,
        regex: Optional[str] = None,
    ) -> Iterator[str]:
        """`generate`, as pieces of text while they are made; they join to its result.
        Leaving the loop early stops the generation."""
        handle = self._completion(
            prompt, True, images, max_tokens, json_schema, grammar, regex,
            _sampling(temperature, top_k, top_p, min_p, presence_penalty,
                      frequency_penalty, repetition_penalty, seed, stop),
        )
        return _Texts(_Chunks(handle))

    async def agenerate(self, prompt: str, **kwargs: Any) -> str:
        """`generate` for asyncio: awaits without blocking the event loop."""
        handle = self._completion_kw(prompt, False, kwargs)
        return json.loads(await _await_result(handle))["choices"][0]["text"]

    async def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        """`stream` for asyncio (`async for piece in model.astream(...)`)."""
        handle = self._completion_kw(prompt, True, kwargs)
        async for chunk in _achunks(handle):
            text = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if text:
                yield text

    # -- OpenAI's shapes --------------------------------------------------------------

    def create_chat_completion(
        self, messages: Sequence[Message], *, stream: bool = False, **kwargs: Any
    ) -> Any:
        """A chat completion as OpenAI's API (and the gemma3 server) returns it: a
        `chat.completion` dict, or with `stream=True` an iterator of
        `chat.completion.chunk` dicts. Takes the API's fields as keyword arguments
        (`max_tokens`, `temperature`, `tools`, `tool_choice`, `response_format`,
        `logprobs`, `top_logprobs`, `n`, `seed`, `stop`, ...). Images may be
        `image_url` parts (http(s) or data URLs, or a path) or transformers' `image`
        parts."""
        handle = self._chat(messages, stream, kwargs)
        if stream:
            return _Chunks(handle)
        return json.loads(handle.result())

    def create_completion(self, prompt: Union[str, Sequence[Any]], *, stream: bool = False,
                          **kwargs: Any) -> Any:
        """A (legacy) completion as OpenAI's API returns it: a `text_completion` dict,
        or with `stream=True` an iterator of chunks. `prompt` is text, token ids, or a
        list of either."""
        body = _request(prompt=prompt, stream=stream, **kwargs)
        handle = self._engine.submit("completion", json.dumps(body), [])
        if stream:
            return _Chunks(handle)
        return json.loads(handle.result())

    async def acreate_chat_completion(self, messages: Sequence[Message], **kwargs: Any) -> Any:
        """`create_chat_completion` for asyncio; with `stream=True` an async iterator."""
        stream = bool(kwargs.pop("stream", False))
        handle = self._chat(messages, stream, kwargs)
        if stream:
            return _achunks(handle)
        return json.loads(await _await_result(handle))

    def _chat(self, messages: Sequence[Message], stream: bool, kwargs: Dict[str, Any]) -> Any:
        body = _request(messages=_messages(messages), stream=stream, **kwargs)
        return self._engine.submit("chat", json.dumps(body), [])


def _sampling(
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    presence_penalty: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Optional[Union[str, Sequence[str]]] = None,
) -> Dict[str, Any]:
    if isinstance(stop, str):
        stop = [stop]
    return _request(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty, seed=seed,
        stop=None if stop is None else list(stop),
    )


class _Texts:
    """A completion stream's text pieces; closing (or leaving) it cancels the request,
    started or not."""

    def __init__(self, chunks: _Chunks) -> None:
        self._chunks = chunks

    def __iter__(self) -> "_Texts":
        return self

    def __next__(self) -> str:
        while True:
            chunk = next(self._chunks)
            choices = chunk.get("choices") or []
            text = choices[0].get("text", "") if choices else ""
            if text:
                return text

    def close(self) -> None:
        self._chunks.close()


async def _await_result(handle: Any) -> str:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, handle.result)
    except BaseException:
        handle.cancel()
        raise


async def _achunks(handle: Any) -> AsyncIterator[Dict[str, Any]]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            text = await loop.run_in_executor(None, handle.next_chunk)
            if text is None:
                return
            yield _chunk(text)
    finally:
        handle.cancel()


# -- transformers' pipeline ---------------------------------------------------------

_TASKS = ("text-generation", "image-text-to-text")


class Pipeline:
    """transformers' `pipeline` for Gemma 3: called with a prompt or a conversation,
    it returns `[{"generated_text": ...}]` as transformers does."""

    def __init__(self, task: str, model: Model) -> None:
        if task not in _TASKS:
            raise BadRequestError(f"unknown task {task!r}: gemma3 offers {', '.join(_TASKS)}")
        self.task = task
        self.model = model

    def __call__(
        self,
        text: Any = None,
        images: Any = None,
        *,
        max_new_tokens: int = DEFAULT_MAX_TOKENS,
        return_full_text: bool = True,
        do_sample: Optional[bool] = None,
        **kwargs: Any,
    ) -> Any:
        if text is None and "text_inputs" in kwargs:
            text = kwargs.pop("text_inputs")
        if do_sample is False:
            kwargs["temperature"] = 0.0
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        # A batch: a list of prompts, or a list of conversations.
        if isinstance(text, (list, tuple)) and text and (
            isinstance(text[0], str) or isinstance(text[0], (list, tuple))
        ):
            return [self._one(t, images, max_new_tokens, return_full_text, kwargs) for t in text]
        return self._one(text, images, max_new_tokens, return_full_text, kwargs)

    def _one(self, text: Any, images: Any, max_new_tokens: int, full: bool,
             kwargs: Dict[str, Any]) -> List[Dict[str, Any]]:
        if isinstance(text, str):
            out = self.model.generate(
                text, max_tokens=max_new_tokens, images=images, **kwargs
            )
            item: Dict[str, Any] = {"generated_text": text + out if full else out}
            if self.task == "image-text-to-text":
                item = {"input_text": text, **item}
            return [item]
        if not isinstance(text, (list, tuple)):
            raise BadRequestError("give a prompt string or a list of chat messages")
        messages = list(text)
        if images:
            # Images given beside a conversation go in front of its first user turn.
            messages = _with_images(messages, images)
        reply = self.model.create_chat_completion(
            messages, max_tokens=max_new_tokens, **kwargs
        )
        content = reply["choices"][0]["message"].get("content") or ""
        answer = {"role": "assistant", "content": content}
        generated: Any = list(text) + [answer] if full else content
        item = {"generated_text": generated}
        if self.task == "image-text-to-text":
            item = {"input_text": list(text), **item}
        return [item]


def _with_images(messages: List[Message], images: Sequence[Any]) -> List[Message]:
    out = []
    placed = False
    for m in messages:
        if not placed and m.get("role") == "user":
            content = m.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            m = dict(m, content=[{"type": "image", "image": i} for i in images] + list(parts))
            placed = True
        out.append(m)
    return out


def pipeline(task: str = "text-generation", model: Union[None, str, "os.PathLike[str]", Model] = None,
             **model_kwargs: Any) -> Pipeline:
    """transformers' `pipeline("text-generation" | "image-text-to-text", model=...)`:
    `model` is a `gemma3.Model`, or what `Model` takes (other keywords go to `Model`)."""
    if not isinstance(model, Model):
        model = Model(model, **model_kwargs)
    return Pipeline(task, model)
