"""Generation engines behind one interface: ``generate(prompts, seed) -> completions`` (token ids).

* :class:`TransformersEngine`: ``model.generate`` with its KV cache, prompts left-padded into one batch, sampling
  seeded per call under a forked RNG (the training RNG is untouched), each completion cut after its first EOS.
* :class:`VLLMEngine`: vLLM colocated on the training GPU (lazy import; ``pip install 'distily[gpu]'``); the
  student's weights are pushed to it with :meth:`VLLMEngine.sync` every ``--vllm_sync_steps`` optimizer steps.

Both return completions of at most ``max_new_tokens`` tokens, ending with an EOS token when the model emitted one.
"""

from __future__ import annotations

import contextlib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (the run's ``--max_new_tokens``, ``--generation_temperature``, ...)."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def cut_at_eos(tokens: list[int], eos_token_ids: tuple[int, ...], pad_token_id: int) -> list[int]:
    """``tokens`` up to and including the first EOS; without one, with trailing padding removed."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: position + 1]
    while tokens and tokens[-1] == pad_token_id and pad_token_id not in eos_token_ids:
        tokens = tokens[:-1]
    return tokens


class GenerationEngine(ABC):
    """Samples completions of token-id prompts."""

    name: str

    def __init__(self, settings: SamplingSettings):
        self.settings = settings

    @abstractmethod
    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """One completion per prompt; the same ``seed`` and weights give the same completions."""

    def sync(self, model: nn.Module, step: int) -> None:  # noqa: B027 (engines that read the live model need none)
        """After optimizer step ``step``: bring the engine's copy of the weights up to date (if it keeps one)."""


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, longest prompt), padded on the left as ``generate`` expects."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNGs (CPU, and ``device``'s when it is CUDA) seeded with ``seed``, restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TransformersEngine(GenerationEngine):
    """``model.generate`` on the live model (the student as it trains, or the frozen teacher)."""

    name = "transformers"

    def __init__(self, model: Callable[[], nn.Module], settings: SamplingSettings):
        super().__init__(settings)
        self._model = model  # a callable, so that the engine always samples from the current (unwrapped) module

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        model = self._model()
        settings = self.settings
        device = next(model.parameters()).device
        input_ids, attention_mask = left_pad(prompts, settings.pad_token_id, device)
        sampling = {"do_sample": False}
        if settings.temperature > 0:
            sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        was_training = model.training
        model.eval()
        try:
            with seeded(seed, device):
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=settings.pad_token_id,
                    eos_token_id=list(settings.eos_token_ids),
                    use_cache=True,
                    **sampling,
                )
        finally:
            model.train(was_training)
        new = output[:, input_ids.shape[1] :].cpu().tolist()
        return [cut_at_eos(row, settings.eos_token_ids, settings.pad_token_id) for row in new]


def vllm_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights as ``(name, tensor)`` pairs in the names of the plain model vLLM loaded: a LoRA
    student's adapters merged into its base weights (``base_model.model.`` and ``base_layer.`` removed, the
    adapters' own tensors left out)."""
    if hasattr(model, "merge_adapter") and hasattr(model, "unmerge_adapter"):
        model.merge_adapter()
        try:
            for name, tensor in model.state_dict().items():
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                yield name, tensor.detach()
        finally:
            model.unmerge_adapter()
        return
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach()


class VLLMEngine(GenerationEngine):
    """vLLM's ``LLM`` colocated with the training on one GPU.

    The engine starts from a copy of the student saved to a temporary folder (config, weights, tokenizer) and
    then receives the student's weights in memory by :meth:`sync` (``load_weights`` on vLLM's model), every
    ``sync_steps`` optimizer steps. Each request is seeded (``seed`` + its row), so a resumed run with the same
    weights draws the same samples. ``llm`` may be given (a test's stand-in with the same methods).
    """

    name = "vllm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        settings: SamplingSettings,
        sync_steps: int = 1,
        gpu_memory_utilization: float = 0.3,
        llm=None,
    ):
        super().__init__(settings)
        self.sync_steps = sync_steps
        self.synced_steps: list[int] = []
        self.llm = llm if llm is not None else self._start(model, tokenizer, gpu_memory_utilization)

    @staticmethod
    def _start(model: nn.Module, tokenizer, gpu_memory_utilization: float):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ConfigError(
                "--generation_backend vllm needs vLLM: pip install 'distily[gpu]' (CUDA machines only), or use "
                "--generation_backend transformers."
            ) from err
        folder = tempfile.mkdtemp(prefix="distily-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return LLM(model=folder, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)

    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from vllm import SamplingParams

        settings = self.settings
        params = [
            SamplingParams(
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p if settings.temperature > 0 else 1.0,
                stop_token_ids=list(settings.eos_token_ids),
                seed=seed + row,
            )
            for row in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": prompt} for prompt in prompts]
        results = self.llm.generate(requests, params, use_tqdm=False)
        return [
            cut_at_eos(list(result.outputs[0].token_ids), settings.eos_token_ids, settings.pad_token_id)
            for result in results
        ]

    def sync(self, model: nn.Module, step: int) -> None:
        """Push the student's weights into vLLM after every ``sync_steps``-th optimizer step."""
        if step % self.sync_steps:
            return
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in vllm_weights(model):
            target.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()
        self.synced_steps.append(step)


def build_engine(backend: str, model: Callable[[], nn.Module], tokenizer, settings: SamplingSettings, args):
    """The engine named by ``--generation_backend`` for the student (``model`` returns the current module)."""
    if backend == "vllm":
        return VLLMEngine(
            model(),
            tokenizer,
            settings,
            sync_steps=args.vllm_sync_steps,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        )
    return TransformersEngine(model, settings)
