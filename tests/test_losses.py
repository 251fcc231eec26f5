"""The loss registry: golden values, identities, TRL parity, masking, gradients, bf16, the registry itself.

Reference values are computed independently of torch, in float64 numpy, straight from each loss's textbook
formula, and compared with :func:`distily.distillation_loss` (which applies the temperature, the T² factor,
the padding mask and the per-token mean).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import distily
from distily import LOSSES, build_loss, distillation_loss, register_loss
from distily.losses import forward_kl

from .conftest import tiny_llama_config

# Three tokens over a five-word vocabulary; hard-coded so the golden values below stay fixed.
STUDENT = [
    [0.5, -1.2, 2.0, 0.3, -0.7],
    [1.5, 0.2, -0.4, -2.1, 0.9],
    [-0.3, 0.8, 0.1, 1.7, -1.5],
]
TEACHER = [
    [1.1, -0.5, 1.4, -0.2, 0.0],
    [0.3, 1.9, -1.0, -0.6, 0.4],
    [0.7, -0.9, 0.6, 2.2, -0.1],
]

# Every registered loss with the parameters each golden value is checked at: (id, name, loss_kwargs).
CASES = [
    ("forward_kl", "forward_kl", {}),
    ("reverse_kl", "reverse_kl", {}),
    ("jsd_0.1", "generalized_jsd", {"beta": 0.1}),
    ("jsd_0.5", "generalized_jsd", {"beta": 0.5}),
    ("jsd_0.9", "generalized_jsd", {"beta": 0.9}),
    ("skew_kl", "skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", "skew_reverse_kl", {"alpha": 0.1}),
    ("total_variation", "total_variation", {}),
    ("mse", "mse", {}),
    ("cosine", "cosine", {}),
]
CASE_IDS = [case[0] for case in CASES]
BUILTIN_LOSSES = {case[1] for case in CASES}

# The per-token mean over STUDENT/TEACHER at T = 1, computed once with `reference` below (float64 numpy) and
# pasted here, so a change that broke both the loss and its reference would still be caught.
GOLDEN_T1 = {
    "forward_kl": 0.3775919853167755,
    "reverse_kl": 0.3841451880345024,
    "jsd_0.1": 0.03298745505950192,
    "jsd_0.5": 0.08771100606458289,
    "jsd_0.9": 0.033291558060129595,
    "skew_kl": 0.2895648866948695,
    "skew_reverse_kl": 0.2906136656662022,
    "total_variation": 0.33639167794996583,
    "mse": 1.0326666666666668,
    "cosine": 0.40876301812008403,
}


# -- an independent float64 reference ------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(a || b) = Σ a log(a / b), per row."""
    return (a * (np.log(a) - np.log(b))).sum(-1)


def reference(name: str, kwargs: dict, student, teacher, temperature: float = 1.0) -> np.ndarray:
    """Per-token T² · D(student/T, teacher/T) from the textbook formulas; p is the teacher, q the student."""
    s = np.asarray(student, dtype=np.float64) / temperature
    t = np.asarray(teacher, dtype=np.float64) / temperature
    p, q = _softmax(t), _softmax(s)
    if name == "forward_kl":
        value = _kl(p, q)
    elif name == "reverse_kl":
        value = _kl(q, p)
    elif name == "generalized_jsd":
        beta = kwargs["beta"]
        m = beta * p + (1 - beta) * q
        value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    elif name == "skew_kl":
        alpha = kwargs["alpha"]
        value = _kl(p, alpha * p + (1 - alpha) * q)
    elif name == "skew_reverse_kl":
        alpha = kwargs["alpha"]
        value = _kl(q, alpha * q + (1 - alpha) * p)
    elif name == "total_variation":
        value = 0.5 * np.abs(p - q).sum(-1)
    elif name == "mse":
        value = ((s - t) ** 2).mean(-1)
    elif name == "cosine":
        value = 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    else:
        raise AssertionError(name)
    return temperature**2 * value


def _loss(student, teacher, name, kwargs, temperature=1.0, mask=None, num_tokens=None, dtype=torch.float32):
    s = torch.as_tensor(student, dtype=dtype)
    t = torch.as_tensor(teacher, dtype=dtype)
    return distillation_loss(s, t, mask, build_loss(name, kwargs), temperature, num_tokens)


@pytest.fixture
def scratch_names():
    """Names registered by a test; unregistered afterwards so the registry is left as it was found."""
    names: list[str] = []
    yield names
    for name in names:
        LOSSES.unregister(name)


# -- 1. golden values -------------------------------------------------------------------------------------------


def test_every_builtin_loss_has_a_golden_value():
    builtins = {name for name, entry in LOSSES.items() if getattr(entry, "__module__", None) == "distily.losses"}
    assert builtins == BUILTIN_LOSSES


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_pasted_golden_value_matches_reference(case, name, kwargs):
    assert reference(name, kwargs, STUDENT, TEACHER).mean() == pytest.approx(GOLDEN_T1[case], rel=1e-12)


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_golden_value(case, name, kwargs, temperature):
    expected = reference(name, kwargs, STUDENT, TEACHER, temperature).mean()
    got = _loss(STUDENT, TEACHER, name, kwargs, temperature)
    assert got.dtype == torch.float32
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if temperature == 1.0:
        assert got.item() == pytest.approx(GOLDEN_T1[case], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_golden_value_float64_keeps_full_precision(case, name, kwargs):
    got = _loss(STUDENT, TEACHER, name, kwargs, temperature=1.5, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference(name, kwargs, STUDENT, TEACHER, 1.5).mean(), rel=1e-12, abs=1e-15)


# Worked by hand on one token with a two-word vocabulary:
#   student logits (0, 0)     -> q = (1/2, 1/2)
#   teacher logits (ln 3, 0)  -> p = (3/4, 1/4)
#   forward KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2                      = 0.130812035941137
#   reverse KL(q||p) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)                             = 0.14384103622589042
#   JSD(beta=1/2): m = (5/8, 3/8); 1/2 [3/4 ln(6/5) + 1/4 ln(2/3)] + 1/2 [1/2 ln(16/15)] = 0.03382207556860521
#   TVD = 1/2 (|3/4 - 1/2| + |1/4 - 1/2|)                                                = 0.25
#   MSE = ((0 - ln 3)² + 0²) / 2                                                         = 0.603474480406291
# and for cosine, student (1, 0), teacher (1, 1): 1 - 1/√2                              = 0.29289321881345254
# (decimals evaluated with Python's math module).
HAND_S = [[0.0, 0.0]]
HAND_T = [[math.log(3.0), 0.0]]


@pytest.mark.parametrize(
    ("name", "kwargs", "student", "teacher", "expected"),
    [
        ("forward_kl", {}, HAND_S, HAND_T, 0.130812035941137),
        ("reverse_kl", {}, HAND_S, HAND_T, 0.14384103622589042),
        ("generalized_jsd", {"beta": 0.5}, HAND_S, HAND_T, 0.03382207556860521),
        ("total_variation", {}, HAND_S, HAND_T, 0.25),
        ("mse", {}, HAND_S, HAND_T, 0.603474480406291),
        ("cosine", {}, [[1.0, 0.0]], [[1.0, 1.0]], 0.29289321881345254),
    ],
    ids=["forward_kl", "reverse_kl", "jsd_0.5", "total_variation", "mse", "cosine"],
)
def test_hand_computed_value(name, kwargs, student, teacher, expected):
    assert _loss(student, teacher, name, kwargs).item() == pytest.approx(expected, rel=1e-6)
    assert _loss(student, teacher, name, kwargs, dtype=torch.float64).item() == pytest.approx(expected, rel=1e-12)


# -- 2. identities ----------------------------------------------------------------------------------------------


def _random_logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype) * scale


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_divergence_of_a_distribution_with_itself_is_zero(case, name, kwargs):
    logits = _random_logits(24, 11)
    fn = build_loss(name, kwargs)
    per_token = fn(logits, logits.clone())
    assert per_token.shape == (24,)
    torch.testing.assert_close(per_token, torch.zeros_like(per_token), atol=1e-12, rtol=0)
    batched = logits.reshape(4, 6, 11)
    assert distillation_loss(batched, batched.clone(), None, fn, 2.0).item() == pytest.approx(0.0, abs=1e-12)
    # And a different distribution is not at distance zero.
    assert distillation_loss(batched, _random_logits(4, 6, 11, seed=1), None, fn).item() > 1e-3


def test_jsd_is_symmetric_at_half():
    s, t = _random_logits(8, 13, seed=1), _random_logits(8, 13, seed=2)
    jsd = build_loss("generalized_jsd", {"beta": 0.5})
    torch.testing.assert_close(jsd(s, t), jsd(t, s), rtol=1e-12, atol=1e-14)
    assert jsd(s, t).min() > 0
    # More generally JSD_beta(student, teacher) = JSD_(1-beta)(teacher, student).
    jsd_03, jsd_07 = build_loss("generalized_jsd", {"beta": 0.3}), build_loss("generalized_jsd", {"beta": 0.7})
    torch.testing.assert_close(jsd_03(s, t), jsd_07(t, s), rtol=1e-12, atol=1e-14)


def test_jsd_is_bounded_by_log_two():
    s, t = _random_logits(64, 9, scale=20.0, seed=3), _random_logits(64, 9, scale=20.0, seed=4)
    value = build_loss("generalized_jsd", {"beta": 0.5})(s, t)
    assert value.max() <= math.log(2) + 1e-12
    assert value.min() >= 0


def test_generalized_jsd_end_points_are_the_kls():
    s, t = _random_logits(8, 13, seed=5), _random_logits(8, 13, seed=6)
    forward, reverse = build_loss("forward_kl")(s, t), build_loss("reverse_kl")(s, t)
    torch.testing.assert_close(build_loss("generalized_jsd", {"beta": 0.0})(s, t), forward, rtol=0, atol=0)
    torch.testing.assert_close(build_loss("generalized_jsd", {"beta": 1.0})(s, t), reverse, rtol=0, atol=0)
    assert not torch.allclose(forward, reverse)  # the two end points really differ


def test_skew_kls_at_alpha_zero_are_the_kls():
    s, t = _random_logits(8, 13, seed=7), _random_logits(8, 13, seed=8)
    torch.testing.assert_close(build_loss("skew_kl", {"alpha": 0.0})(s, t), build_loss("forward_kl")(s, t))
    torch.testing.assert_close(build_loss("skew_reverse_kl", {"alpha": 0.0})(s, t), build_loss("reverse_kl")(s, t))
    # A positive skew pulls the target towards the source distribution, so the divergence shrinks.
    assert (build_loss("skew_kl", {"alpha": 0.1})(s, t) < build_loss("forward_kl")(s, t)).all()


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
def test_total_variation_is_in_unit_interval(scale):
    s, t = _random_logits(256, 7, scale=scale, seed=9), _random_logits(256, 7, scale=scale, seed=10)
    value = build_loss("total_variation")(s, t)
    assert value.min() >= 0
    assert value.max() <= 1 + 1e-12  # up to rounding
    if scale == 50.0:  # near-one-hot distributions on different words are almost disjoint
        assert value.max() > 0.99


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_divergences_are_non_negative_on_random_inputs(case, name, kwargs):
    fn = build_loss(name, kwargs)
    for seed in range(5):
        s = _random_logits(128, 17, scale=1.0 + 4 * seed, seed=2 * seed, dtype=torch.float32)
        t = _random_logits(128, 17, scale=1.0 + 4 * seed, seed=2 * seed + 1, dtype=torch.float32)
        per_token = fn(s, t)
        assert per_token.shape == (128,)
        assert torch.isfinite(per_token).all()
        assert per_token.min() >= -1e-6, (seed, per_token.min())


# -- 3. same numbers as TRL -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(trl_generalized_jsd, beta, temperature):
    s, t = _random_logits(3, 5, 11, seed=11), _random_logits(3, 5, 11, seed=12)
    labels = torch.arange(15).reshape(3, 5)
    labels[0, 3:] = -100  # padding at the end of the first sequence
    labels[2, :2] = -100  # and a masked prompt at the start of the last
    ours = distillation_loss(s, t, labels != -100, build_loss("generalized_jsd", {"beta": beta}), temperature)
    theirs = trl_generalized_jsd(s, t, labels=labels, beta=beta, temperature=temperature)
    # distily scales the KD term by T² (Hinton et al.); TRL does not.
    assert ours.item() == pytest.approx(temperature**2 * theirs.item(), rel=1e-10)
    # Both normalise by an external token count the same way (gradient accumulation).
    ours_n = distillation_loss(s, t, labels != -100, build_loss("generalized_jsd", {"beta": beta}), temperature, 40)
    theirs_n = trl_generalized_jsd(s, t, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=40)
    assert ours_n.item() == pytest.approx(temperature**2 * theirs_n.item(), rel=1e-10)
    assert ours_n.item() == pytest.approx(ours.item() * 11 / 40, rel=1e-10)  # 15 positions, 4 masked


# -- 4. temperature ---------------------------------------------------------------------------------------------


def test_temperature_divides_logits_and_scales_by_t_squared():
    s, t = np.array(STUDENT), np.array(TEACHER)
    kl_at_2 = _kl(_softmax(t / 2), _softmax(s / 2)).mean()
    got = _loss(STUDENT, TEACHER, "forward_kl", {}, temperature=2.0, dtype=torch.float64)
    assert got.item() == pytest.approx(4 * kl_at_2, rel=1e-12)
    # Not the same as the KL at T = 1 scaled, nor the unscaled KL at T = 2.
    assert got.item() != pytest.approx(4 * _kl(_softmax(t), _softmax(s)).mean(), rel=1e-3)
    assert got.item() != pytest.approx(kl_at_2, rel=1e-3)


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_temperature_contract_for_every_loss(case, name, kwargs):
    s, t = _random_logits(5, 9, seed=13), _random_logits(5, 9, seed=14)
    fn = build_loss(name, kwargs)
    for temperature in (0.5, 3.0):
        expected = temperature**2 * fn(s / temperature, t / temperature).mean()
        assert distillation_loss(s, t, None, fn, temperature).item() == pytest.approx(expected.item(), rel=1e-12)


def test_mse_is_temperature_free():
    s, t = _random_logits(5, 9, seed=15), _random_logits(5, 9, seed=16)
    mse = build_loss("mse")
    at_1 = distillation_loss(s, t, None, mse, 1.0).item()
    assert distillation_loss(s, t, None, mse, 4.0).item() == pytest.approx(at_1, rel=1e-12)
    assert at_1 == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-12)


# -- 5. masking and normalisation -------------------------------------------------------------------------------


def _padded_batch():
    """(2, 4, 5) logits whose masked positions hold extreme garbage, the real tokens being STUDENT/TEACHER."""
    garbage_s = [[1e30, -1e30, 3e29, 0.0, 7e28]] * 2
    garbage_t = [[-1e30, 1e30, 0.0, -5e29, 2e29]] * 2
    student = torch.tensor([[STUDENT[0], STUDENT[1], *garbage_s], [*garbage_s[:1], STUDENT[2], *garbage_s]])
    teacher = torch.tensor([[TEACHER[0], TEACHER[1], *garbage_t], [*garbage_t[:1], TEACHER[2], *garbage_t]])
    mask = torch.tensor([[True, True, False, False], [False, True, False, False]])
    return student, teacher, mask


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_padding_is_ignored_and_loss_is_mean_over_real_tokens(case, name, kwargs):
    student, teacher, mask = _padded_batch()
    fn = build_loss(name, kwargs)
    got = distillation_loss(student, teacher, mask, fn, 2.0)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(reference(name, kwargs, STUDENT, TEACHER, 2.0).mean(), rel=1e-5, abs=1e-7)
    # An integer mask works like a boolean one.
    assert distillation_loss(student, teacher, mask.long(), fn, 2.0).item() == pytest.approx(got.item(), rel=1e-7)
    # Changing what the padding holds changes nothing.
    other_s, other_t = student.clone(), teacher.clone()
    other_s[~mask] = -other_s[~mask] * 3
    other_t[~mask] = 0.0
    assert distillation_loss(other_s, other_t, mask, fn, 2.0).item() == got.item()


def test_padding_gets_no_gradient():
    student, teacher, mask = _padded_batch()
    student.requires_grad_(True)
    distillation_loss(student, teacher, mask, build_loss("forward_kl"), 2.0).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()


def test_all_padding_gives_zero_not_nan():
    student, teacher, _ = _padded_batch()
    got = distillation_loss(student, teacher, torch.zeros(2, 4, dtype=torch.bool), build_loss("forward_kl"))
    assert got.item() == 0.0


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_tokens_overrides_the_denominator(as_tensor):
    student, teacher, mask = _padded_batch()
    fn = build_loss("reverse_kl")
    total = reference("reverse_kl", {}, STUDENT, TEACHER, 2.0).sum()  # 3 real tokens
    for count in (3, 12, 1000):
        num_tokens = torch.tensor(count) if as_tensor else count
        got = distillation_loss(student, teacher, mask, fn, 2.0, num_tokens)
        assert got.item() == pytest.approx(total / count, rel=1e-5)
    # A zero count (an all-padding accumulated batch) is clamped to one instead of dividing by zero.
    zero = torch.tensor(0) if as_tensor else 0
    assert distillation_loss(student, teacher, mask, fn, 2.0, zero).item() == pytest.approx(total, rel=1e-5)


# -- 6. gradients -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_gradcheck(case, name, kwargs):
    student = _random_logits(2, 3, 5, scale=2.0, seed=17).requires_grad_(True)
    teacher = _random_logits(2, 3, 5, scale=2.0, seed=18)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    fn = build_loss(name, kwargs)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, mask, fn, 1.5), (student,))
    # The teacher side is differentiable too (used by a learned teacher head, and a sanity check of the formula).
    teacher_leaf = teacher.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: distillation_loss(student.detach(), t, mask, fn, 1.5), (teacher_leaf,))


# -- 7. bf16 and extreme logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
def test_bf16_inputs_give_a_float32_result_close_to_fp32(case, name, kwargs):
    s32 = _random_logits(4, 8, 32, scale=3.0, seed=19, dtype=torch.float32)
    t32 = _random_logits(4, 8, 32, scale=3.0, seed=20, dtype=torch.float32)
    fn = build_loss(name, kwargs)
    got = distillation_loss(s32.bfloat16(), t32.bfloat16(), None, fn, 2.0)
    assert got.dtype == torch.float32
    # Exactly the float32 computation on the bf16-rounded values: the divergence itself runs in float32 ...
    exact = distillation_loss(s32.bfloat16().float(), t32.bfloat16().float(), None, fn, 2.0)
    assert got.item() == exact.item()
    # ... so the only difference from full precision is the rounding of the inputs.
    assert got.item() == pytest.approx(distillation_loss(s32, t32, None, fn, 2.0).item(), rel=2e-2)
    # A bf16 student against a float32 teacher (the usual mixed setup) is float32 as well.
    assert distillation_loss(s32.bfloat16(), t32, None, fn, 2.0).dtype == torch.float32


def _extreme_expected(name: str, kwargs: dict, v: float, vocab: int) -> float:
    """Per-token value when the teacher puts all its mass on word 1 and the student on word 0 (logits ±v)."""
    if name in ("forward_kl", "reverse_kl"):
        return 2 * v  # log p1 - log q1 = 0 - (-2v)
    if name == "generalized_jsd":  # disjoint supports: the entropy of beta
        beta = kwargs["beta"]
        return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    if name in ("skew_kl", "skew_reverse_kl"):  # the skew keeps the target at alpha where the other side is 0
        return -math.log(kwargs["alpha"])
    if name == "total_variation":
        return 1.0
    if name == "mse":
        return 2 * (2 * v) ** 2 / vocab
    if name == "cosine":
        return 2.0  # opposite vectors
    raise AssertionError(name)


@pytest.mark.parametrize(("case", "name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits_give_finite_losses_and_gradients(case, name, kwargs, dtype):
    vocab = 6
    student = torch.zeros(3, vocab, dtype=dtype)
    teacher = torch.zeros(3, vocab, dtype=dtype)
    student[:, 0], student[:, 1] = 1e4, -1e4
    teacher[:, 0], teacher[:, 1] = -1e4, 1e4
    student.requires_grad_(True)
    fn = build_loss(name, kwargs)
    loss = distillation_loss(student, teacher, None, fn, 1.0)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    v = teacher[0, 1].float().item()  # 1e4 as the dtype stores it (9984 in bf16)
    assert loss.item() == pytest.approx(_extreme_expected(name, kwargs, v, vocab), rel=1e-4, abs=1e-5)
    loss.backward()
    assert student.grad.dtype == dtype
    assert torch.isfinite(student.grad).all()


# -- 8. build_loss and the registry -----------------------------------------------------------------------------


def test_build_loss_binds_function_kwargs():
    s, t = _random_logits(4, 7, seed=21), _random_logits(4, 7, seed=22)
    bound = build_loss("generalized_jsd", {"beta": 0.9})
    torch.testing.assert_close(bound(s, t), LOSSES["generalized_jsd"](s, t, beta=0.9), rtol=0, atol=0)
    assert not torch.allclose(bound(s, t), LOSSES["generalized_jsd"](s, t))  # not the default beta = 0.5
    # Without kwargs the registered function itself comes back.
    assert build_loss("forward_kl") is forward_kl
    assert build_loss("generalized_jsd", None) is LOSSES["generalized_jsd"]


def test_build_loss_instantiates_a_registered_module(scratch_names):
    @register_loss("test_scaled_forward_kl")
    class ScaledForwardKL(nn.Module):
        """scale · KL(p || q)."""

        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, student_logits, teacher_logits):
            return self.scale * forward_kl(student_logits, teacher_logits)

    scratch_names.append("test_scaled_forward_kl")
    module = build_loss("test_scaled_forward_kl", {"scale": 3.0})
    assert isinstance(module, ScaledForwardKL)
    assert module.scale == 3.0
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), None, module)
    assert got.item() == pytest.approx(3 * GOLDEN_T1["forward_kl"], rel=1e-5)
    with pytest.raises(ValueError, match=r"unknown loss_kwargs \['beta'\]; it takes: scale"):
        build_loss("test_scaled_forward_kl", {"beta": 0.5})


def test_build_loss_rejects_unknown_kwargs_naming_accepted_ones():
    with pytest.raises(ValueError, match=r"'generalized_jsd' got unknown loss_kwargs \['alpha'\]; it takes: beta"):
        build_loss("generalized_jsd", {"alpha": 0.1})
    with pytest.raises(ValueError, match=r"'forward_kl' got unknown loss_kwargs \['beta'\]; it takes: no parameters"):
        build_loss("forward_kl", {"beta": 0.5})
    # The two logit tensors are not parameters.
    with pytest.raises(ValueError, match="unknown loss_kwargs"):
        build_loss("skew_kl", {"teacher_logits": None})


def test_unknown_loss_name_lists_every_known_loss():
    with pytest.raises(distily.UnknownNameError) as info:
        build_loss("forward_kll")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert not message.startswith(("'", '"'))  # not wrapped in quotes like a bare KeyError
    assert "Did you mean 'forward_kl'?" in message
    for name in LOSSES:
        assert name in message
    assert "@distily.register_loss('name')" in message
    # The registry behaves as a read-only mapping.
    assert "forward_kl" in LOSSES
    assert "forward_kll" not in LOSSES
    assert LOSSES.get("forward_kll") is None


def test_duplicate_registration_needs_override(scratch_names):
    def first(student_logits, teacher_logits):
        return forward_kl(student_logits, teacher_logits)

    def second(student_logits, teacher_logits):
        return 2 * forward_kl(student_logits, teacher_logits)

    with pytest.raises(ValueError, match=r"'forward_kl' is already registered.*override=True"):
        register_loss("forward_kl")(second)
    assert LOSSES["forward_kl"] is forward_kl  # the built-in was not replaced

    assert register_loss("test_duplicate")(first) is first  # the decorator returns the entry unchanged
    scratch_names.append("test_duplicate")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("test_duplicate")(second)
    assert LOSSES["test_duplicate"] is first
    register_loss("test_duplicate", override=True)(second)
    assert LOSSES["test_duplicate"] is second

    for bad in ("", " padded ", None):
        with pytest.raises(ValueError, match="non-empty string"):
            register_loss(bad)


def test_loss_returning_the_wrong_shape_is_rejected():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)

    def scalar(student_logits, teacher_logits):
        return forward_kl(student_logits, teacher_logits).mean()

    def per_element(student_logits, teacher_logits):
        return (student_logits - teacher_logits).abs()

    with pytest.raises(ValueError, match=r"one value per token, shape \(3,\); got \(\)"):
        distillation_loss(s, t, None, scalar)
    with pytest.raises(ValueError, match=r"one value per token, shape \(3,\); got \(3, 5\)"):
        distillation_loss(s, t, None, per_element)


def test_vocabulary_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"different vocabulary sizes \(5 vs 4\).*shared tokenizer"):
        distillation_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), None, forward_kl)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("generalized_jsd", {"beta": 1.5}, "0 <= beta <= 1"),
        ("skew_kl", {"alpha": 1.0}, "0 <= alpha < 1"),
        ("skew_reverse_kl", {"alpha": -0.1}, "0 <= alpha < 1"),
    ],
)
def test_out_of_range_parameters_are_rejected(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), None, build_loss(name, kwargs))


# -- 9. a custom loss in a real training run --------------------------------------------------------------------


def test_custom_loss_trains_a_tiny_student(tmp_path, scratch_names):
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    @register_loss("test_scaled_l2")
    def scaled_l2(student_logits, teacher_logits, *, scale: float = 1.0):
        """scale · ½ Σ (p − q)²: a squared-L2 distance between the two distributions."""
        calls.append((student_logits.detach().clone(), teacher_logits.detach().clone()))
        return scale * 0.5 * (teacher_logits.softmax(-1) - student_logits.softmax(-1)).pow(2).sum(-1)

    scratch_names.append("test_scaled_l2")

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():  # a random head is near-uniform; sharpen it so the two models visibly disagree
        teacher.lm_head.weight.mul_(20.0)
    student = distily.build_student(teacher, {"num_hidden_layers": 2})
    student_before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tiny_llama_config().vocab_size, (12, 16), generator=generator)
    temperature = 2.0
    args = distily.DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        seq_len=16,
        loss="test_scaled_l2",
        loss_kwargs='{"scale": 2.0}',
        temperature=temperature,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = distily.DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_dict({"input_ids": ids.tolist()})
    )
    assert len(calls) == 1 and calls[0][0].shape == (1, 4)  # DistillationConfig's check of the parameters
    calls.clear()
    trainer.train()

    # Called once per step on 4 sequences × 15 next-token positions.
    assert len(calls) == 3
    assert all(s.shape == t.shape == (60, 128) for s, t in calls)
    # The teacher side is the frozen teacher's logits divided by T, for every sequence of the epoch exactly once.
    with torch.no_grad():
        teacher_all = teacher(input_ids=ids).logits[:, :-1] / temperature
    seen = []
    for _, t in calls:
        for row in t.reshape(4, 15, -1):
            matches = [k for k in range(12) if torch.allclose(row, teacher_all[k], atol=1e-5)]
            assert len(matches) == 1
            seen.append(matches[0])
    assert sorted(seen) == list(range(12))

    # The logged KD term is T² · mean over tokens of the loss, recomputed here in float64 numpy.
    logged = [entry for entry in trainer.state.log_history if "loss_kd" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    for entry, (s, t) in zip(logged, calls, strict=True):
        p, q = _softmax(t.double().numpy()), _softmax(s.double().numpy())
        expected = temperature**2 * (2.0 * 0.5 * ((p - q) ** 2).sum(-1)).mean()
        assert expected > 1e-2
        assert entry["loss_kd"] == pytest.approx(expected, abs=1e-6)  # logged rounded to 6 decimals
        assert entry["loss"] == pytest.approx(entry["loss_kd"], rel=1e-3, abs=1e-5)  # alpha = 1

    # The student learned; the teacher did not.
    after = student.state_dict()
    assert any(not torch.equal(student_before[k], after[k]) for k in student_before)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


# -- 10. config validation --------------------------------------------------------------------------------------


def test_config_rejects_unknown_loss_listing_known_ones(tmp_path):
    with pytest.raises(distily.ConfigError) as info:
        distily.DistillationConfig(output_dir=str(tmp_path), loss="reverse_kld")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "Unknown loss 'reverse_kld'" in message
    assert "Did you mean 'reverse_kl'?" in message
    for name in BUILTIN_LOSSES:
        assert name in message
    assert "--loss" in message


def test_config_parses_and_checks_loss_kwargs(tmp_path):
    config = distily.DistillationConfig(output_dir=str(tmp_path), loss="generalized_jsd", loss_kwargs='{"beta": 0.9}')
    assert config.loss_kwargs == {"beta": 0.9}
    with pytest.raises(distily.ConfigError, match="not valid JSON"):
        distily.DistillationConfig(output_dir=str(tmp_path), loss="generalized_jsd", loss_kwargs='{"beta": 0.9')
    with pytest.raises(distily.ConfigError, match="must be a JSON object"):
        distily.DistillationConfig(output_dir=str(tmp_path), loss="generalized_jsd", loss_kwargs="[0.9]")
    with pytest.raises(distily.ConfigError, match=r"unknown loss_kwargs \['alpha'\]; it takes: beta"):
        distily.DistillationConfig(output_dir=str(tmp_path), loss="generalized_jsd", loss_kwargs={"alpha": 0.1})


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_config_rejects_bad_temperature(tmp_path, temperature):
    with pytest.raises(distily.ConfigError, match="--temperature must be a finite number > 0"):
        distily.DistillationConfig(output_dir=str(tmp_path), temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_config_rejects_alpha_outside_unit_interval(tmp_path, alpha):
    with pytest.raises(distily.ConfigError, match=r"--alpha must be in \[0, 1\]"):
        distily.DistillationConfig(output_dir=str(tmp_path), alpha=alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_config_accepts_alpha_end_points(tmp_path, alpha):
    assert distily.DistillationConfig(output_dir=str(tmp_path), alpha=alpha, temperature=2.0).alpha == alpha


def test_unknown_names_list_the_known_ones_in_the_plural():
    from distily.registry import Registry

    with pytest.raises(ValueError, match=r"Unknown loss 'kl_forward'.*Known losses: "):
        build_loss("kl_forward", {})
    assert Registry("box", "x").plural == "boxes" and Registry("layer mapper", "x").plural == "layer mappers"
    assert Registry("datum", "x", plural="data").plural == "data"
