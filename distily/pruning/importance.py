"""Importance of every head, neuron, channel and layer, from forward hooks on calibration blocks (no gradients).

Per token, each unit has a value ``s`` (Minitron, Muralidharan et al. 2024, section 2.2):

* **attention head** h of a layer: ``‖W_o[:, h] · x_h‖``, the norm of what the head writes into the residual
  stream (its output through its own columns of the output projection), so a head whose output columns are zero
  scores exactly 0;
* **MLP neuron** j: ``act(gate_j) · up_j`` (GPT-2: ``act(fc_j)``), the input of the down projection;
* **embedding channel** c: the residual stream's value at c where each norm reads it (the input of every decoder
  norm, and of the final norm); the channel's score is the sum of its scores at the norms of the kept layers;
* **layer** i: block importance ``1 − cos(x_i, x_{i+1})`` averaged over tokens (Men et al. 2024, ShortGPT), and
  the increase of the LM loss when the layer is skipped (measured on the first ``layer_loss_blocks`` blocks).

The per-token values are reduced over batch and sequence by one of three aggregations, all kept from the same
pass (:class:`Stat`): ``mean`` (mean of ``|s|``), ``l2`` (root mean square) and ``variance``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config.prune import AGGREGATIONS, MIN_CALIBRATION_TOKENS
from ..errors import PruneError
from .families import Family, Shape


class Stat:
    """Running sums of a per-token value for each of ``units`` units: enough for every aggregation."""

    def __init__(self, units: int):
        self.abs_sum = torch.zeros(units, dtype=torch.float64)
        self.sq_sum = torch.zeros(units, dtype=torch.float64)
        self.sum = torch.zeros(units, dtype=torch.float64)
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        """Add ``values`` of shape ``(tokens, units)``."""
        values = values.detach().reshape(-1, self.sum.numel()).to(torch.float64).cpu()
        self.abs_sum += values.abs().sum(0)
        self.sq_sum += values.square().sum(0)
        self.sum += values.sum(0)
        self.count += values.shape[0]

    def score(self, aggregation: str) -> torch.Tensor:
        """``mean``: mean |s|; ``l2``: √(mean s²); ``variance``: mean s² − (mean s)²."""
        if self.count == 0:
            raise PruneError("No calibration tokens reached this unit: nothing to score.")
        if aggregation == "mean":
            return self.abs_sum / self.count
        if aggregation == "l2":
            return (self.sq_sum / self.count).sqrt()
        if aggregation == "variance":
            return (self.sq_sum / self.count - (self.sum / self.count).square()).clamp_min(0)
        raise PruneError(f"Unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}.")


@dataclass
class Importance:
    """Every score one calibration pass measured; :meth:`heads` and the others reduce them by an aggregation."""

    shape: Shape
    head_stats: list[Stat]
    neuron_stats: list[Stat]
    channel_stats: list[list[Stat]]  # per layer: one Stat per norm the layer has
    final_channel_stat: Stat
    block_importance: torch.Tensor  # (layers,)
    drop_loss: torch.Tensor  # (layers,): LM-loss increase when the layer is skipped
    base_loss: float  # mean LM loss of the full model on the drop-loss blocks
    tokens: int
    layer_loss_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)

    def heads(self, aggregation: str) -> torch.Tensor:
        """``(layers, query heads)``."""
        return torch.stack([stat.score(aggregation) for stat in self.head_stats])

    def neurons(self, aggregation: str) -> torch.Tensor:
        """``(layers, neurons)``."""
        return torch.stack([stat.score(aggregation) for stat in self.neuron_stats])

    def channels(self, aggregation: str, layers: list[int] | None = None) -> torch.Tensor:
        """``(hidden,)``: summed over the norms of ``layers`` (default all) and the final norm."""
        layers = range(len(self.channel_stats)) if layers is None else layers
        total = self.final_channel_stat.score(aggregation).clone()
        for index in layers:
            for stat in self.channel_stats[index]:
                total += stat.score(aggregation)
        return total

    def layers(self, layer_score: str) -> torch.Tensor:
        """``(layers,)``: higher is more important."""
        if layer_score == "block_importance":
            return self.block_importance
        if layer_score == "drop_loss":
            return self.drop_loss
        raise PruneError(f"Unknown layer score {layer_score!r}: use block_importance or drop_loss.")


def check_calibration(calibration_ids: torch.Tensor, flag: str = "--calibration_blocks") -> torch.Tensor:
    """Calibration ids as a ``(blocks, tokens)`` LongTensor with at least :data:`MIN_CALIBRATION_TOKENS` tokens."""
    ids = torch.as_tensor(calibration_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise PruneError(f"Calibration ids must be a (blocks, tokens) tensor of token ids, got {tuple(ids.shape)}.")
    if ids.shape[1] < 2 or ids.numel() < MIN_CALIBRATION_TOKENS:
        raise PruneError(
            f"{ids.numel()} calibration tokens ({ids.shape[0]} blocks of {ids.shape[1]}) are too few to rank "
            f"anything: importance needs at least {MIN_CALIBRATION_TOKENS} tokens in blocks of at least 2. Raise "
            f"{flag} (or --seq_len)."
        )
    return ids.long()


class _Recorder:
    """Forward hooks on every layer of ``model``: they update the stats and keep what the drop-loss pass needs."""

    def __init__(self, model: nn.Module, family: Family, shape: Shape):
        self.family, self.shape = family, shape
        self.layers = family.layers(model)
        n = len(self.layers)
        self.heads = [Stat(shape.num_attention_heads) for _ in range(n)]
        self.neurons = [Stat(shape.intermediate_size) for _ in range(n)]
        self.channels = [[Stat(shape.hidden_size) for _ in family.layer_norms(layer)] for layer in self.layers]
        self.final = Stat(shape.hidden_size)
        self.distance_sum = torch.zeros(n, dtype=torch.float64)
        self.distance_count = 0
        self.keep_inputs = False
        self.inputs: list[list] = [[] for _ in range(n)]  # per layer, per kept batch: (hidden, args, kwargs)
        self.last_input: torch.Tensor | None = None
        self.handles = []
        for index, layer in enumerate(self.layers):
            self._hook_layer(index, layer)
        self.handles.append(family.final_norm(model).register_forward_pre_hook(self._channel_hook(self.final)))

    def _hook_layer(self, index: int, layer: nn.Module) -> None:
        weight = self.family.head_output_weight(layer, self.shape)
        heads, head_dim = self.shape.num_attention_heads, self.shape.head_dim

        def heads_hook(module, args):
            x = args[0].reshape(-1, heads, head_dim)
            written = torch.einsum("thd,khd->thk", x.to(weight.dtype), weight)  # each head's residual write
            self.heads[index].update(written.norm(dim=-1))

        def neurons_hook(module, args):
            self.neurons[index].update(args[0])

        def layer_input_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.last_input = hidden
            if self.keep_inputs:
                rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
                self.inputs[index].append((hidden, args[1:], rest))

        def layer_output_hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(self.last_input.float(), out.float(), dim=-1)
            self.distance_sum[index] += (1 - cos).sum().double().cpu()
            if index == 0:
                self.distance_count += cos.numel()

        self.handles += [
            self.family.attention_output(layer).register_forward_pre_hook(heads_hook),
            self.family.mlp_output(layer).register_forward_pre_hook(neurons_hook),
            layer.register_forward_pre_hook(layer_input_hook, with_kwargs=True),
            layer.register_forward_hook(layer_output_hook, with_kwargs=True),
        ]
        for stat, norm in zip(self.channels[index], self.family.layer_norms(layer), strict=True):
            self.handles.append(norm.register_forward_pre_hook(self._channel_hook(stat)))

    @staticmethod
    def _channel_hook(stat: Stat):
        def hook(module, args):
            stat.update(args[0])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _lm_loss_sum(model: nn.Module, family: Family, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy of the model's final norm and head applied to ``hidden``."""
    logits = model.get_output_embeddings()(family.final_norm(model)(hidden))
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"
    ).item()


@torch.no_grad()
def measure_importance(
    model: nn.Module,
    family: Family,
    calibration_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    layer_loss_blocks: int = 8,
    progress: bool = True,
) -> Importance:
    """One pass over ``calibration_ids`` with hooks (every unit's stats, block importance), then the drop-loss
    pass on the first ``layer_loss_blocks`` blocks: for each layer i, the kept input of layer i is run through
    layers i+1.. (with the arguments the model gave each layer), the final norm and the head."""
    ids = check_calibration(calibration_ids)
    shape = family.shape(model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, family, shape)
    loss_blocks = min(layer_loss_blocks, ids.shape[0])
    seconds: dict[str, float] = {}
    kept_ids, base_loss = [], 0.0
    try:
        started = time.perf_counter()
        # The drop-loss blocks first, with every layer's input kept; then the rest.
        batches = [(batch, True) for batch in torch.split(ids[:loss_blocks], batch_size)]
        batches += [(batch, False) for batch in torch.split(ids[loss_blocks:], batch_size) if len(batch)]
        for batch, keep in tqdm(batches, desc="Importance", disable=not progress):
            batch = batch.to(device)
            recorder.keep_inputs = keep
            logits = model(input_ids=batch, use_cache=False).logits
            if keep:
                kept_ids.append(batch)
                base_loss += F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                ).item()
        recorder.remove()
        seconds["activations"] = time.perf_counter() - started

        started = time.perf_counter()
        n_layers = len(recorder.layers)
        drop = torch.zeros(n_layers, dtype=torch.float64)
        steps = n_layers * len(kept_ids)
        with tqdm(total=steps, desc="Layer drop loss", disable=not progress) as bar:
            for index in range(n_layers):
                total = 0.0
                for number, batch in enumerate(kept_ids):
                    hidden, _, _ = recorder.inputs[index][number]
                    for later in range(index + 1, n_layers):
                        _, args, kwargs = recorder.inputs[later][number]
                        out = recorder.layers[later](hidden, *args, **kwargs)
                        hidden = out[0] if isinstance(out, tuple) else out
                    total += _lm_loss_sum(model, family, hidden, batch)
                    bar.update(1)
                drop[index] = total
        predicted = sum(batch[:, 1:].numel() for batch in kept_ids)
        seconds["drop_loss"] = time.perf_counter() - started
    finally:
        recorder.remove()
        model.train(was_training)
    return Importance(
        shape=shape,
        head_stats=recorder.heads,
        neuron_stats=recorder.neurons,
        channel_stats=recorder.channels,
        final_channel_stat=recorder.final,
        block_importance=(recorder.distance_sum / max(recorder.distance_count, 1)).float(),
        drop_loss=((drop - base_loss) / predicted).float(),
        base_loss=base_loss / predicted,
        tokens=ids.numel(),
        layer_loss_tokens=sum(batch.numel() for batch in kept_ids),
        seconds=seconds,
    )
