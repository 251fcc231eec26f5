"""On-policy distillation (GKD, DistiLLM): the student trains on sequences it (or the teacher) samples.

One concern per module:

* :mod:`.prompts` -- where prompts come from: the start of each training block, or a file of chat prompts;
* :mod:`.engines` -- the generation engines behind one interface: transformers ``generate``, vLLM colocated;
* :mod:`.replay` -- the replay buffer of student samples (DistiLLM's off-policy reuse), saved in checkpoints;
* :mod:`.batch` -- prompts + completions as a training batch whose labels cover the completion only;
* :mod:`.sampler` -- per micro-batch: keep the data, sample from the student or the teacher, or replay; seeded
  per step, so a resumed run draws the same samples; its log entries.

:class:`distily.DistillationTrainer` calls :class:`OnPolicySampler` on every micro-batch before the step counts
its tokens, so the loss (the registry's divergence, the chunked path) is normalised by the completion tokens.
"""

from __future__ import annotations

from .batch import completion_batch
from .engines import GenerationEngine, SamplingSettings, TransformersEngine, VLLMEngine, build_engine
from .prompts import BlockPrompts, ChatPrompts, PromptSource, build_prompt_source
from .replay import ReplayBuffer
from .sampler import OnPolicyCallback, OnPolicySampler, build_sampler, eos_token_ids, step_seed

__all__ = [
    "BlockPrompts",
    "ChatPrompts",
    "GenerationEngine",
    "OnPolicyCallback",
    "OnPolicySampler",
    "PromptSource",
    "ReplayBuffer",
    "SamplingSettings",
    "TransformersEngine",
    "VLLMEngine",
    "build_engine",
    "build_prompt_source",
    "build_sampler",
    "completion_batch",
    "eos_token_ids",
    "step_seed",
]
