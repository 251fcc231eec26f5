"""Generation backends for ``distily synth``: local ``transformers``, ``vllm`` and any OpenAI-compatible API.

Every backend takes an *iterator* of :class:`GenerationRequest` and yields one :class:`Generation` per request
as results arrive (in any order). The runner feeds the iterator lazily, so it decides when to stop (token
budget) and the backend decides how many requests are in flight (a batch, or ``concurrency`` HTTP calls).

Secrets: the API key is read from the environment variable named by ``api_key_env`` and kept only inside the
client; every error message that leaves the API backend goes through :func:`redact`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..data.synth_format import plain_chat
from ..errors import ConfigError, SynthError

logger = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class GenerationRequest:
    """One sample to generate: chat ``messages`` or raw ``prompt`` text, and its own sampling settings."""

    id: str
    messages: list[dict[str, str]] | None
    prompt: str | None
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass
class Generation:
    """A backend's answer to one request; ``error`` is set (and ``text`` empty) when it failed for good."""

    id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    error: str | None = None


class Backend(Protocol):
    """What the synth runner needs from a backend."""

    name: str

    def describe(self) -> dict[str, Any]:
        """What to record in the manifest about the teacher (never a secret)."""

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens of ``request`` (exact for local backends, an upper-side estimate for APIs)."""

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Generation]:
        """One :class:`Generation` per request, as they complete."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (of 4+ characters) replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def render_prompt(tokenizer, request: GenerationRequest) -> str:
    """The text a local model sees: its chat template (with the generation prompt) or the raw prompt."""
    if request.messages is None:
        return request.prompt or ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    return plain_chat(request.messages)


def _take(iterator: Iterator[GenerationRequest], count: int) -> list[GenerationRequest]:
    batch = []
    for request in iterator:
        batch.append(request)
        if len(batch) == count:
            break
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Local transformers


class RowSampling:
    """Logits processor: per-row temperature and top-p, so one batch can mix settings (a temperature schedule).

    Row ``i`` is divided by ``temperatures[i]`` (0 means greedy: everything but the argmax is removed), then
    its nucleus of probability ``top_p[i]`` is kept. ``generate`` is called with ``do_sample=True`` and neutral
    built-in warpers, so this is the only place sampling is shaped.
    """

    def __init__(self, temperatures: list[float], top_p: list[float]):
        import torch

        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_p = torch.tensor(top_p, dtype=torch.float32)

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        temperatures = self.temperatures.to(scores.device)
        top_p = self.top_p.to(scores.device)
        greedy = temperatures <= 0
        scores = scores / torch.where(greedy, torch.ones_like(temperatures), temperatures).unsqueeze(-1)
        if bool((top_p >= 1.0).all()):
            return self._greedy_rows(scores, greedy)
        # Nucleus: drop the tokens after the cumulative probability passes top_p (always keep the best one).
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p.unsqueeze(-1)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return self._greedy_rows(scores.masked_fill(drop, float("-inf")), greedy)

    @staticmethod
    def _greedy_rows(scores, greedy):
        import torch

        if greedy.any():
            best = scores.argmax(-1, keepdim=True)
            only_best = torch.full_like(scores, float("-inf")).scatter(-1, best, 0.0)
            scores = torch.where(greedy.unsqueeze(-1), only_best, scores)
        return scores


class TransformersBackend:
    """Batched ``model.generate`` on a local model (CPU or GPU) with left padding."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 8, teacher: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.teacher = teacher
        self.device = next(model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "teacher": self.teacher,
            "model_class": type(self.model).__name__,
            "dtype": str(next(self.model.parameters()).dtype),
            "device": str(self.device),
            "batch_size": self.batch_size,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.tokenizer(render_prompt(self.tokenizer, request), add_special_tokens=False)["input_ids"])

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Generation]:
        iterator = iter(requests)
        while batch := _take(iterator, self.batch_size):
            yield from self._generate_batch(batch)

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        tokenizer = self.tokenizer
        texts = [render_prompt(tokenizer, request) for request in batch]
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        encoded = {key: value.to(self.device) for key, value in encoded.items()}
        stop = self._stop_ids()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max(request.max_new_tokens for request in batch),
            pad_token_id=pad,
            eos_token_id=stop,
        )
        processor = RowSampling([r.temperature for r in batch], [r.top_p for r in batch])
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(batch[0].seed)  # the batch's first sample seeds it: reruns of a batch repeat
            output = self.model.generate(**encoded, generation_config=config, logits_processor=[processor])
        prompt_length = encoded["input_ids"].shape[1]
        results = []
        for row, request in enumerate(batch):
            new = output[row, prompt_length:].tolist()
            cut = next((i for i, token in enumerate(new) if token in stop), None)
            finish = "stop" if cut is not None and cut < request.max_new_tokens else "length"
            kept = new[: cut + 1] if cut is not None else new
            kept = kept[: request.max_new_tokens]
            text_ids = [t for t in kept if t not in stop]
            results.append(
                Generation(
                    id=request.id,
                    text=tokenizer.decode(text_ids, skip_special_tokens=True),
                    finish_reason=finish,
                    prompt_tokens=int(encoded["attention_mask"][row].sum()),
                    completion_tokens=len(kept),
                )
            )
        return results


# ----------------------------------------------------------------------------------------------------------------
# vLLM (GPU)


def import_vllm():
    """``vllm``, or an error naming the extra that installs it."""
    try:
        import vllm
    except ImportError as err:
        raise SynthError(
            f"--backend vllm needs the vllm package, which is not importable here ({err}). Install the GPU extra: "
            "pip install 'distily[gpu]' (vLLM runs on CUDA GPUs), or use --backend transformers."
        ) from None
    return vllm


class VLLMBackend:
    """Offline batched generation with ``vllm.LLM`` (continuous batching on a GPU).

    Chat requests are rendered with the model's own tokenizer (the same chat template the transformers backend
    uses), then sent as plain prompts with one ``SamplingParams`` per request.
    """

    name = "vllm"

    def __init__(self, llm, tokenizer, chunk_size: int = 256, teacher: str | None = None, sampling_params=None):
        self.llm = llm
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.teacher = teacher
        self.sampling_params = sampling_params or import_vllm().SamplingParams

    @classmethod
    def load(cls, teacher: str, tokenizer, dtype: str = "auto", seed: int = 0, chunk_size: int = 256, **engine_kwargs):
        from .loading import resolve_teacher_path

        vllm = import_vllm()
        folder, gguf_file = resolve_teacher_path(teacher)
        model = os.path.join(folder, gguf_file) if gguf_file else folder
        kwargs = {"tokenizer": folder} if gguf_file else {}
        llm = vllm.LLM(model=model, dtype=dtype, seed=seed, **kwargs, **engine_kwargs)
        return cls(llm, tokenizer, chunk_size=chunk_size, teacher=teacher, sampling_params=vllm.SamplingParams)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "teacher": self.teacher, "chunk_size": self.chunk_size}

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.tokenizer(render_prompt(self.tokenizer, request), add_special_tokens=False)["input_ids"])

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Generation]:
        iterator = iter(requests)
        while chunk := _take(iterator, self.chunk_size):
            prompts = [render_prompt(self.tokenizer, request) for request in chunk]
            params = [
                self.sampling_params(
                    n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens, seed=r.seed
                )
                for r in chunk
            ]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for request, output in zip(chunk, outputs, strict=True):
                best = output.outputs[0]
                yield Generation(
                    id=request.id,
                    text=best.text,
                    finish_reason=best.finish_reason,
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(best.token_ids),
                )


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP API


def import_openai():
    try:
        import openai
    except ImportError as err:
        raise SynthError(
            f"--backend openai needs the openai client, which is not installed ({err}). Install the API extra: "
            "pip install 'distily[api]'."
        ) from None
    return openai


def read_api_key(env_name: str) -> str:
    """The key from the environment variable ``env_name``; errors never show a value."""
    if not ENV_NAME.match(env_name or ""):
        # Never echo the value: it may be the key itself, pasted by mistake.
        raise ConfigError(
            "--api_key_env must be the NAME of an environment variable holding the key (like OPENAI_API_KEY), "
            "not the key itself. Export the key and pass the variable's name."
        )
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"The environment variable {env_name} (named by --api_key_env) is not set or empty.")
    return key


def retry_after_seconds(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None  # neither seconds nor a date: fall back to exponential backoff
    return max(seconds, 0.0) if math.isfinite(seconds) else None


@dataclass
class RetryPolicy:
    """Retries on 429, 5xx, timeouts and dropped connections: wait ``Retry-After`` when the server sends one,
    else ``min(backoff_max, backoff_base · 2^(attempt−1))`` scaled by a random factor in [0.5, 1] (jitter).
    Waits are capped at ``backoff_max``."""

    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        return min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)


RETRYABLE_STATUS = {408, 409, 425, 429}


class OpenAIBackend:
    """Chat completions (or completions, for continuation templates) from an OpenAI-compatible server.

    ``concurrency`` requests are in flight at once (threads sharing one client). The client's own retries are
    off (``max_retries=0``): :class:`RetryPolicy` retries here, so every attempt is counted and budgeted.
    """

    name = "openai"

    def __init__(
        self,
        api_model: str,
        api_key_env: str = "OPENAI_API_KEY",
        api_base: str | None = None,
        concurrency: int = 8,
        request_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        client=None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.api_model = api_model
        self.api_key_env = api_key_env
        self.api_base = api_base
        self.concurrency = concurrency
        self.request_timeout = request_timeout
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self._openai = import_openai()
        self._key = read_api_key(api_key_env)
        self._client = client or self._openai.OpenAI(
            api_key=self._key, base_url=api_base, timeout=request_timeout, max_retries=0
        )
        self.retries = 0  # counted across worker threads, under the lock
        self._lock = threading.Lock()

    @property
    def secrets(self) -> list[str]:
        return [self._key]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "api_model": self.api_model,
            "api_base": strip_credentials(self.api_base),
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "request_timeout": self.request_timeout,
            "max_retries": self.retry.max_retries,
        }

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        # No tokenizer for a remote model: ~3 characters per token errs on the high side for English and code.
        if request.messages is None:
            return len(request.prompt or "") // 3 + 1
        return sum(len(m["content"]) // 3 + 8 for m in request.messages) + 3

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Generation]:
        iterator = iter(requests)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="distily-synth")
        in_flight: set[Future] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < self.concurrency:
                    request = next(iterator, None)
                    if request is None:
                        exhausted = True
                        break
                    in_flight.add(pool.submit(self._call, request))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # _call returns failures as values; only fatal errors raise
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _call(self, request: GenerationRequest) -> Generation:
        openai = self._openai
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._request_once(request, attempt)
            except openai.APIStatusError as err:
                status = err.status_code
                message = redact(f"HTTP {status}: {err.message}", self.secrets)
                if status in (401, 403):
                    raise SynthError(
                        f"The API refused the key ({message}). Check the key in ${self.api_key_env} and --api_base."
                    ) from None
                if status not in RETRYABLE_STATUS and status < 500:
                    return Generation(id=request.id, attempts=attempt, error=message)  # e.g. 400: retrying won't help
                wait_for = retry_after_seconds(err.response.headers if err.response is not None else None)
            except openai.APIConnectionError as err:  # includes APITimeoutError
                message = redact(f"{type(err).__name__}: {err}", self.secrets)
                wait_for = None
            if attempt > self.retry.max_retries:
                return Generation(id=request.id, attempts=attempt, error=f"gave up after {attempt} attempts: {message}")
            delay = self.retry.delay(attempt, wait_for)
            with self._lock:
                self.retries += 1
            logger.warning("Request %s: %s; retry %d in %.2f s.", request.id, message, attempt, delay)
            self.sleep(delay)

    def _request_once(self, request: GenerationRequest, attempt: int) -> Generation:
        common = dict(
            model=self.api_model,
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            timeout=self.request_timeout,
        )
        if request.messages is not None:
            response = self._client.chat.completions.create(messages=request.messages, **common)
            choice = response.choices[0]
            text = choice.message.content or ""
        else:
            response = self._client.completions.create(prompt=request.prompt, **common)
            choice = response.choices[0]
            text = choice.text or ""
        usage = response.usage
        return Generation(
            id=request.id,
            text=text,
            finish_reason=choice.finish_reason,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            attempts=attempt,
        )


def strip_credentials(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part, for manifests and logs."""
    if not url:
        return url
    return re.sub(r"(?<=://)[^/@]*@", "", url)
