"""Chunked logit losses: the LM head and the divergence, a chunk of tokens at a time.

With a 49k-150k vocabulary the logits dominate a distillation step: a ``(tokens, vocab)`` float32 tensor per
model, plus the softmaxes, the divergence's temporaries and the gradient of the student's logits. The
chunked path never holds them for the whole batch. It starts from the *final hidden states* (student and
teacher) and, for each chunk of ``chunk_size`` real tokens, computes

1. the student's logits ``head(h)`` and the teacher signal for those tokens;
2. the per-token objective (:class:`TokenObjective`: the registered divergence, the cross-entropy terms);
3. right away, its gradient with respect to the chunk's hidden states and the head's parameters.

Step 3 happens inside the forward pass of a custom autograd function (:class:`ChunkedHeadLoss`), so the
backward pass only hands back the stored gradients: the head runs once forward and twice backward per
token, exactly as in the plain path, and nothing of vocabulary size outlives its chunk. Because the gradient
of a chunk comes from ``torch.autograd.grad`` on whatever the loss computes, every registered loss works,
user-registered ones included, and so does any head module (a plain ``nn.Linear``, a tied embedding, a LoRA
wrapped head).

The teacher side is a :class:`TeacherSignal`: anything that gives the teacher's logits for a range of the
selected tokens. :class:`HeadTeacherSignal` applies a live teacher's head to its final hidden states one
chunk at a time; :class:`LogitsTeacherSignal` wraps logits already in memory (the plain path). A recorded
teacher can provide its own signal (for example logits rebuilt from cached top-k log-probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .losses import LossFn, token_divergence
from .sparse import SparseTeacher, sparse_token_divergence

# Components of the statistics every objective returns, summed over tokens: the KD term (T² included), the
# student's cross-entropy and the teacher's cross-entropy (for the eval perplexities).
STAT_NAMES = ("kd_sum", "ce_sum", "teacher_ce_sum")


class TeacherSignal:
    """The teacher's side of the objective for the selected (real) tokens, one range of rows at a time."""

    def logits(self, rows: slice) -> Tensor:
        """Teacher logits of shape ``(rows, vocab)`` for the selected tokens ``rows`` (no gradient)."""
        raise NotImplementedError


class LogitsTeacherSignal(TeacherSignal):
    """Teacher logits already computed for every selected token, shape ``(N, V)``."""

    def __init__(self, logits: Tensor):
        self._logits = logits

    def logits(self, rows: slice) -> Tensor:
        return self._logits[rows]


class SparseTeacherSignal(TeacherSignal):
    """A teacher known only by its top-k log-probabilities and tail mass per token (a recorded teacher).

    :class:`TokenObjective` computes the divergence on the ``k + 1`` buckets (:mod:`distily.sparse`) and takes
    the teacher's cross-entropy from :meth:`teacher_nll` (recorded from the full logits).
    """

    def logits(self, rows: slice) -> Tensor:
        raise TypeError("A sparse teacher signal has no logits; use top_k(rows) (see distily.sparse).")

    def top_k(self, rows: slice) -> SparseTeacher:
        """The teacher's top-k ids, log-probabilities and tail log-mass for the selected tokens ``rows``."""
        raise NotImplementedError

    def teacher_nll(self, rows: slice) -> Tensor:
        """The teacher's next-token cross-entropy for the selected tokens ``rows``, shape ``(rows,)``."""
        raise NotImplementedError


class HeadTeacherSignal(TeacherSignal):
    """A live teacher's head applied to its final hidden states ``(N, H)``, a chunk at a time.

    The head runs in the teacher's own dtype (bf16 teachers give bf16 logits, as their ``forward`` would); the
    divergence upcasts them to float32 per chunk.
    """

    def __init__(self, hidden: Tensor, head: nn.Module, device: torch.device | None = None):
        self.hidden = hidden
        self.head = head
        self.device = device  # where the logits go (the student's device); None: where the teacher is

    def logits(self, rows: slice) -> Tensor:
        with torch.no_grad():
            logits = self.head(self.hidden[rows])
        return logits if self.device is None else logits.to(self.device)


@dataclass
class TokenObjective:
    """The per-token training objective over the selected tokens, evaluated on any range of them.

    ``objective = kd_weight · T² · Σ D(s/T, t/T) + ce_weight · Σ CE(s, labels)`` over the rows, where D is
    ``loss_fn``; the statistics (:data:`STAT_NAMES`) are returned beside it, detached. The plain path
    calls it once on all tokens, the chunked path once per chunk: the numbers are the same up to summation
    order.
    """

    labels: Tensor
    loss_fn: LossFn | None = None
    teacher: TeacherSignal | None = None
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    student_ce: bool = False
    teacher_ce: bool = False
    # Evaluation: the sequence (batch row) of each selected token, to sum the statistics per sequence.
    sequence_ids: Tensor | None = None
    num_sequences: int = 0

    def __post_init__(self):
        if (self.loss_fn is not None or self.teacher_ce) and self.teacher is None:
            raise ValueError("TokenObjective needs a teacher signal for its KD term or the teacher's cross-entropy.")
        if self.sequence_ids is not None and self.num_sequences < 1:
            raise ValueError("TokenObjective with sequence_ids needs num_sequences >= 1.")

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """``(3,)`` summed over tokens, or ``(3, num_sequences)`` summed per sequence."""
        return (len(STAT_NAMES),) if self.sequence_ids is None else (len(STAT_NAMES), self.num_sequences)

    @property
    def has_terms(self) -> bool:
        """Whether any per-token term is computed (not: hidden-state components only, during training)."""
        return bool(self.loss_fn is not None or self.student_ce or self.teacher_ce)

    def zeros(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(objective, stats)`` of an objective without terms: zeros, computed without any logits."""
        return torch.zeros((), device=device), torch.zeros(self.stats_shape, device=device)

    def __call__(self, student_logits: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """``(objective, stats)`` for ``student_logits`` of the selected tokens ``rows``."""
        labels = self.labels[rows]
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        zeros = torch.zeros(labels.shape[0], dtype=dtype, device=student_logits.device)
        objective = torch.zeros((), dtype=dtype, device=student_logits.device)
        kd, ce, teacher_ce = zeros, zeros, zeros  # per token
        sparse = isinstance(self.teacher, SparseTeacherSignal)
        teacher_logits = self.teacher.logits(rows) if self.teacher is not None and not sparse else None
        if self.loss_fn is not None:
            if sparse:
                kd = sparse_token_divergence(student_logits, self.teacher.top_k(rows), self.loss_fn, self.temperature)
            else:
                kd = token_divergence(student_logits, teacher_logits, self.loss_fn, self.temperature)
            kd = kd * self.temperature**2
            objective = objective + self.kd_weight * kd.sum()
        if self.student_ce:
            ce = F.cross_entropy(student_logits.to(dtype), labels, ignore_index=-100, reduction="none")
            if self.ce_weight:
                objective = objective + self.ce_weight * ce.sum()
        if self.teacher_ce and sparse:
            teacher_ce = self.teacher.teacher_nll(rows).to(device=student_logits.device, dtype=dtype)
        elif self.teacher_ce:
            teacher_ce = F.cross_entropy(teacher_logits.to(dtype), labels, ignore_index=-100, reduction="none")
        per_token = torch.stack([kd.detach().to(dtype), ce.detach(), teacher_ce.detach().to(dtype)])
        if self.sequence_ids is None:
            return objective, per_token.sum(-1)
        stats = per_token.new_zeros(self.stats_shape)
        return objective, stats.index_add_(1, self.sequence_ids[rows].to(stats.device), per_token)


class ChunkedHeadLoss(torch.autograd.Function):
    """``Σ_chunks objective(head(hidden[chunk]), chunk)`` with the gradient computed chunk by chunk in forward.

    Inputs: ``hidden`` ``(N, H)``, the ``head`` module, the ``objective`` (:class:`TokenObjective` or any
    callable with its signature), ``chunk_size``, whether to compute gradients, then the head's parameters
    (passed explicitly so autograd routes their gradients). Outputs: the objective (a scalar) and the summed
    statistics (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, head, objective, chunk_size, compute_grad, *params):
        trainable = [p for p in params if p.requires_grad] if compute_grad else []
        need_hidden = compute_grad and hidden.requires_grad
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grads_by_param: dict[int, Tensor] = {}
        linear = _plain_linear(head, hidden)
        total, stats = None, None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, hidden.shape[0]))
            chunk = hidden[rows].detach()
            if not (need_hidden or trainable):  # evaluation: values only
                with torch.no_grad():
                    value, chunk_stats = objective(head(chunk), rows)
            elif linear:
                # nn.Linear head: differentiate the objective with respect to the chunk's logits only, then apply
                # the head's backward by hand, accumulating the weight gradient in place.
                with torch.no_grad():
                    logits = head(chunk)
                with torch.enable_grad():
                    value, chunk_stats = objective(logits.requires_grad_(), rows)
                    (grad_logits,) = torch.autograd.grad(value, [logits]) if value.requires_grad else (None,)
                if grad_logits is not None:
                    _linear_backward(head, chunk, grad_logits, rows, grad_hidden, trainable, grads_by_param)
            else:
                # Any other head (LoRA, hooks, autocast): autograd through it, one chunk at a time.
                with torch.enable_grad():
                    chunk.requires_grad_(need_hidden)
                    value, chunk_stats = objective(head(chunk), rows)
                    wrt = ([chunk] if need_hidden else []) + trainable
                    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else ()
                if grads and need_hidden:
                    grad_hidden[rows] = grads[0]
                    grads = grads[1:]
                for param, grad in zip(trainable, grads, strict=False):
                    if grad is not None:
                        _accumulate(grads_by_param, param, grad)
            value, chunk_stats = value.detach(), chunk_stats.detach()
            total = value if total is None else total + value
            stats = chunk_stats if stats is None else stats + chunk_stats
        if total is None:  # no selected tokens at all
            total = hidden.new_zeros((), dtype=torch.float32)
            stats = hidden.new_zeros(getattr(objective, "stats_shape", (len(STAT_NAMES),)), dtype=torch.float32)
        # One gradient per parameter (None for frozen ones and for parameters no chunk touched).
        ctx.param_grads = [grads_by_param.get(id(p)) for p in params]
        ctx.grad_hidden = grad_hidden
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, grad_stats):
        grad_hidden = ctx.grad_hidden.mul_(grad_total) if ctx.grad_hidden is not None else None
        param_grads = [g.mul_(grad_total) if g is not None else None for g in ctx.param_grads]
        ctx.grad_hidden, ctx.param_grads = None, []  # free them as soon as autograd has them
        return (grad_hidden, None, None, None, None, *param_grads)


def _plain_linear(head: nn.Module, hidden: Tensor) -> bool:
    """True for an ``nn.Linear`` head (no subclass, no hooks) whose logits have the dtype of its weight and of
    ``hidden``: its backward is two matrix products, done by hand. Anything else (autocast, LoRA, custom heads)
    goes through autograd."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or head._backward_hooks:
        return False
    if torch.is_autocast_enabled(hidden.device.type):
        return False
    return hidden.dtype == head.weight.dtype


def _accumulate(grads_by_param: dict[int, Tensor], param: Tensor, grad: Tensor) -> None:
    previous = grads_by_param.get(id(param))
    if previous is None:
        grads_by_param[id(param)] = grad
    else:
        previous.add_(grad)


def _linear_backward(head, chunk, grad_logits, rows, grad_hidden, trainable, grads_by_param) -> None:
    """The backward of ``logits = chunk @ W.T + b`` for one chunk, accumulated into the running gradients."""
    weight, bias = head.weight, head.bias
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if weight.requires_grad and any(p is weight for p in trainable):
        previous = grads_by_param.get(id(weight))
        if previous is None:
            grads_by_param[id(weight)] = grad_logits.t().mm(chunk)
        else:
            previous.addmm_(grad_logits.t(), chunk)
    if bias is not None and any(p is bias for p in trainable):
        _accumulate(grads_by_param, bias, grad_logits.sum(0))


def chunked_head_objective(
    hidden: Tensor, head: nn.Module, objective: TokenObjective, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``(objective, stats)`` of :class:`TokenObjective` over ``head(hidden)``, computed ``chunk_size`` tokens at
    a time; differentiable with respect to ``hidden`` and the head's parameters.

    ``hidden`` is ``(N, H)``: the student's final hidden states of the selected tokens, in the order of
    ``objective.labels`` and the teacher signal's rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    params = tuple(head.parameters())
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    return ChunkedHeadLoss.apply(hidden, head, objective, chunk_size, compute_grad, *params)


# Logits per chunk chosen by auto_chunk_size. CPU: at most 32 MiB per float32 tensor (glibc's largest mmap
# threshold), so chunks mostly reuse heap memory instead of faulting in fresh pages, while the head's matmuls
# still see enough rows. Accelerators: longer chunks, which their matmuls need to run at full speed.
CHUNK_LOGITS_CPU = 2**23
CHUNK_LOGITS_ACCELERATOR = 2**26


def auto_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Tokens per chunk: the largest power of two (at least 16) whose ``(tokens, vocab)`` logits stay within
    :data:`CHUNK_LOGITS_CPU` elements on CPU or :data:`CHUNK_LOGITS_ACCELERATOR` elsewhere."""
    budget = CHUNK_LOGITS_CPU if torch.device(device).type == "cpu" else CHUNK_LOGITS_ACCELERATOR
    tokens = max(budget // max(vocab_size, 1), 1)
    return max(16, 1 << (tokens.bit_length() - 1))


# ----------------------------------------------------------------------------------------------------------------
# Final hidden states without full logits


def student_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None):
    """``(final hidden states (B, L, H), outputs)`` of a causal LM, asking it for the logits of one position only.

    Calls ``model`` itself (not its inner decoder) so that wrappers such as DistributedDataParallel or PEFT see
    the forward pass. ``hidden_states[-1]`` is the final (normed) hidden state in transformers 5.
    """
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True, logits_to_keep=1
    )
    return outputs.hidden_states[-1], outputs


def teacher_hidden_states(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The teacher's final hidden states ``(B, L, H)``, from its decoder (no head, no intermediate states kept)."""
    decoder = teacher.get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def hidden_state_path_problem(model: nn.Module, teacher: bool = False) -> str | None:
    """Why the chunked path cannot stand in for ``model``'s logits, or None when it can.

    Runs the model once on four tokens (in eval mode, no gradients, no random numbers drawn) and compares its
    logits with ``get_output_embeddings()`` applied to the final hidden states as the chunked path gets them.
    A model that post-processes its logits (soft-capping, scaling) or lacks ``logits_to_keep`` fails here.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned None)"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    device = next(model.parameters()).device
    ids = (torch.arange(1, 5, device=device) % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
            if teacher:
                hidden = teacher_hidden_states(model, ids, None)
            else:
                hidden, outputs = student_hidden_states(model, ids, None)
                if outputs.logits is not None and outputs.logits.shape[1] != 1:
                    return f"{type(model).__name__} ignores logits_to_keep"
            got = head(hidden)
    except Exception as err:  # any failure means: use the plain path
        return f"{type(model).__name__} cannot give its final hidden states ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    expected, got = expected.float(), got.float()
    if got.shape != expected.shape:
        return f"head(hidden states) has shape {tuple(got.shape)}, the logits {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1.0)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(scale)):
        return (
            f"{type(model).__name__}'s logits are not its output embeddings applied to its final hidden states "
            "(the model post-processes its logits)"
        )
    return None
