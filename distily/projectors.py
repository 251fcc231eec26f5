"""The projector registry: maps student features ``(N, d_s)`` to the teacher's width ``(N, d_t)``.

A projector is an ``nn.Module`` class built as ``cls(student_dim, teacher_dim, **projector_kwargs)``. The
trainer builds one per mapped layer pair, trains its parameters with the student (their own optimizer
parameter group, learning rate ``projector_learning_rate`` or the student's), saves them in each checkpoint
as ``projectors.safetensors`` and restores them on resume. They are never part of the exported student.

Register your own::

    @distily.register_projector("scaled")
    class Scaled(nn.Module):
        def __init__(self, student_dim, teacher_dim, *, scale=1.0): ...
        def forward(self, x): ...  # (N, student_dim) -> (N, teacher_dim)
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .registry import Registry, check_kwargs

PROJECTORS: Registry = Registry("projector", "distily.register_projector")


def register_projector(name: str, *, override: bool = False):
    """Register an ``nn.Module`` class ``(student_dim, teacher_dim, **kwargs)`` under ``name``."""
    return PROJECTORS.register(name, override=override)


@register_projector("identity")
class Identity(nn.Module):
    """y = x. Only for equal widths (no parameters)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        if student_dim != teacher_dim:
            raise ValueError(
                f"projector 'identity' needs equal widths, but the student's features have {student_dim} dimensions "
                f"and the teacher's {teacher_dim}. Use projector: linear (or orthogonal, mlp)."
            )

    def forward(self, x: Tensor) -> Tensor:
        return x


@register_projector("linear")
class Linear(nn.Module):
    """y = W x (+ b), W of shape (d_t, d_s). Starts at the identity when the widths are equal (``identity_init``)."""

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = False, identity_init: bool = True):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        if identity_init and student_dim == teacher_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(student_dim))
                if bias:
                    self.proj.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@register_projector("orthogonal")
class Orthogonal(nn.Module):
    """y = Q x with Q (d_t, d_s) semi-orthogonal at every step (QᵀQ = I when d_t ≥ d_s, else QQᵀ = I).

    Kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal`` with the Cayley map (one linear solve per
    forward; no matrix exponential rebuilt by hand). PyTorch's default for non-square weights, Householder,
    collapses to the zero matrix after a few AdamW steps (``tests/test_hidden.py`` checks orthogonality after
    training), so it is not the default. An orthogonal map preserves norms and angles: it only rotates the
    student's features into the teacher's basis.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, orthogonal_map: str = "cayley"):
        super().__init__()
        linear = nn.Linear(student_dim, teacher_dim, bias=False)
        self.proj = parametrizations.orthogonal(linear, orthogonal_map=orthogonal_map)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@register_projector("mlp")
class MLP(nn.Module):
    """y = W₂ GELU(W₁ x + b₁) + b₂, hidden width ``hidden_dim`` (default the teacher's width)."""

    def __init__(self, student_dim: int, teacher_dim: int, *, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or teacher_dim
        self.net = nn.Sequential(nn.Linear(student_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, teacher_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_projector("ensemble")
class Ensemble(nn.Module):
    """y = (1/M) Σ_m P_m(x): the mean of several projectors, ``members`` (default ``[linear, mlp]``).

    Each member is a name, or ``{name: ..., kwargs: {...}}``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, members: list | None = None):
        super().__init__()
        members = list(members or ["linear", "mlp"])
        if not members:
            raise ValueError("projector 'ensemble' needs at least one member, e.g. members: [linear, mlp].")
        built = []
        for member in members:
            name, kwargs = (member, {}) if isinstance(member, str) else (member.get("name"), member.get("kwargs"))
            if name == "ensemble":
                raise ValueError("projector 'ensemble' cannot contain another ensemble.")
            built.append(build_projector(name, student_dim, teacher_dim, kwargs))
        self.members = nn.ModuleList(built)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def check_projector_kwargs(name: str, kwargs: dict | None) -> None:
    """Reject parameters the projector ``name`` does not take, listing those it does."""
    params = list(inspect.signature(PROJECTORS[name].__init__).parameters.values())[3:]
    check_kwargs(f"Projector {name!r}", "projector_kwargs", params, kwargs)


def build_projector(name: str, student_dim: int, teacher_dim: int, kwargs: dict | None = None) -> nn.Module:
    """Instantiate projector ``name`` for these widths with its ``projector_kwargs``."""
    check_projector_kwargs(name, kwargs)
    return PROJECTORS[name](student_dim, teacher_dim, **(kwargs or {}))
