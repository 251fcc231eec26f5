"""Hidden-state and attention objectives: layer mappers, projectors, feature losses, config, trainer, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import distily
from distily import ConfigError, DistillationConfig, DistillationTrainer, build_student
from distily.cli import parse_with_yaml
from distily.config import config_to_dict, configs_from_dict, parse_objective
from distily.feature_losses import FEATURE_LOSSES, FEATURE_NORMS
from distily.layer_mappers import LAYER_MAPPERS, map_layers
from distily.projectors import build_projector
from distily.registry import UnknownNameError

from .conftest import TINY_VOCAB, tiny_llama_config

SEQ = 16

# ----------------------------------------------------------------------------------------------------------------
# Layer mappers: golden pairs for a 30-layer teacher and a 4-layer student


@pytest.mark.parametrize(
    ("name", "kwargs", "pairs"),
    [
        ("all", {}, [(1, 7), (2, 15), (3, 22), (4, 30)]),
        ("last", {}, [(4, 30)]),
        ("last_k", {"k": 2}, [(3, 22), (4, 30)]),
        ("last_k", {"k": 1}, [(4, 30)]),
        ("indices", {"pairs": [[1, 8], [4, 30]]}, [(1, 8), (4, 30)]),
        ("uniform", {}, [(1, 7), (2, 14), (3, 21), (4, 28)]),
        ("uniform", {"stride": 2}, [(1, 2), (2, 4), (3, 6), (4, 8)]),
        ("uniform_last", {}, [(1, 9), (2, 16), (3, 23), (4, 30)]),
        ("uniform_last", {"stride": 3}, [(1, 21), (2, 24), (3, 27), (4, 30)]),
        ("source", {"layers": [0, 10, 19, 29]}, [(1, 1), (2, 11), (3, 20), (4, 30)]),
        ("auto", {}, [(1, 9), (2, 16), (3, 23), (4, 30)]),  # no record given: uniform_last
        ("auto", {"layers": [0, 10, 19, 29]}, [(1, 1), (2, 11), (3, 20), (4, 30)]),  # a pruned student's: source
    ],
)
def test_mapper_golden_pairs(name, kwargs, pairs):
    assert map_layers(name, 4, 30, kwargs) == pairs


def test_equal_depth_maps_layer_to_layer():
    for name in ("all", "uniform", "uniform_last"):
        assert map_layers(name, 3, 3) == [(1, 1), (2, 2), (3, 3)]


def test_bad_mapper_input_is_explained():
    with pytest.raises(ValueError, match=r"out of range: \[\(5, 30\)\].*1\.\.4 for the student"):
        map_layers("indices", 4, 30, {"pairs": [[5, 30]]})
    with pytest.raises(ValueError, match=r"out of range: \[\(1, 31\)\]"):
        map_layers("indices", 4, 30, {"pairs": [[1, 31]]})
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        map_layers("last_k", 4, 30, {"k": 5})
    with pytest.raises(ValueError, match="unknown layer_mapper_kwargs \\['n'\\]; it takes: k"):
        map_layers("last_k", 4, 30, {"n": 2})
    with pytest.raises(ValueError, match="stride of at most 7"):
        map_layers("uniform", 4, 30, {"stride": 8})
    with pytest.raises(
        UnknownNameError, match="Known layer mappers: all, auto, indices, last, last_k, source, uniform, uniform_last"
    ):
        map_layers("every_other", 4, 30)


def test_custom_mapper_registers_with_a_decorator():
    @distily.register_layer_mapper("first_to_first")
    def first_to_first(student_layers, teacher_layers):
        return [(1, 1)]

    try:
        assert map_layers("first_to_first", 4, 30) == [(1, 1)]
        parse_objective({"hidden_states": {"layer_mapper": "first_to_first"}})
    finally:
        LAYER_MAPPERS.unregister("first_to_first")


# ----------------------------------------------------------------------------------------------------------------
# Projectors


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("linear", {}), ("linear", {"bias": True}), ("orthogonal", {}), ("mlp", {"hidden_dim": 48}), ("ensemble", {})],
)
@pytest.mark.parametrize(("d_s", "d_t"), [(64, 128), (32, 32)])
def test_projector_shapes_and_gradients(name, kwargs, d_s, d_t):
    torch.manual_seed(0)
    projector = build_projector(name, d_s, d_t, kwargs)
    x = torch.randn(5, d_s, requires_grad=True)
    y = projector(x)
    assert y.shape == (5, d_t)
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = list(projector.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_identity_and_linear_start_as_identity_at_equal_width():
    x = torch.randn(3, 16)
    assert torch.equal(build_projector("identity", 16, 16)(x), x)
    torch.testing.assert_close(build_projector("linear", 16, 16)(x), x)
    with pytest.raises(ValueError, match=r"identity' needs equal widths.*Use projector: linear"):
        build_projector("identity", 64, 128)


def test_ensemble_is_the_mean_of_its_members():
    """Golden values worked out by hand, not recomputed from the module's own members."""
    ensemble = build_projector("ensemble", 2, 2, {"members": ["linear", {"name": "mlp", "kwargs": {"hidden_dim": 1}}]})
    linear, mlp = ensemble.members
    with torch.no_grad():  # linear starts at the identity (equal widths); the MLP gets hand-picked weights
        mlp.net[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        mlp.net[0].bias.zero_()
        mlp.net[2].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        mlp.net[2].bias.copy_(torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(linear.proj.weight, torch.eye(2))
    # x = (1, 0.5): linear gives (1, 0.5); the MLP's hidden unit is GELU(1.5) = 1.5 · Φ(1.5) = 1.39978919805, so it
    # gives (2 · 1.39978919805 + 0.5, -1.39978919805); the ensemble is the mean of the two.
    expected = torch.tensor([[(1.0 + 3.2995783961) / 2, (0.5 - 1.39978919805) / 2]])
    torch.testing.assert_close(ensemble(torch.tensor([[1.0, 0.5]])), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("d_s", "d_t"), [(64, 128), (32, 32)])
def test_orthogonal_stays_orthogonal_after_optimizer_steps(d_s, d_t):
    torch.manual_seed(0)
    projector = build_projector("orthogonal", d_s, d_t)
    target = torch.randn(8, d_t)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=0.1)
    first = projector.proj.weight.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        (projector(torch.randn(8, d_s)) - target).pow(2).mean().backward()
        optimizer.step()
    weight = projector.proj.weight.detach()  # (d_t, d_s): orthonormal columns
    assert not torch.allclose(weight, first)  # it did train
    torch.testing.assert_close(weight.T @ weight, torch.eye(d_s), atol=1e-5, rtol=0)


def test_unknown_projector_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="Known projectors: ensemble, identity, linear, mlp, orthogonal"):
        parse_objective({"hidden_states": {"projector": "lienar"}})
    with pytest.raises(ConfigError, match="Did you mean 'linear'"):
        parse_objective({"hidden_states": {"projector": "lienar"}})


# ----------------------------------------------------------------------------------------------------------------
# Feature losses and norms


def test_feature_losses_golden_values():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(FEATURE_LOSSES["mse"](s, t), torch.tensor([4 / 3, 2 / 3]))
    torch.testing.assert_close(FEATURE_LOSSES["cosine"](s, t), torch.tensor([1 - 10 / (14**0.5 * 10**0.5), 1.0]))
    torch.testing.assert_close(FEATURE_LOSSES["cosine"](s, 2 * s), torch.zeros(2))
    # normalised MSE is scale-free: layer_norm(2x + 1) == layer_norm(x)
    norm = FEATURE_NORMS["layer_norm"]
    torch.testing.assert_close(FEATURE_LOSSES["mse"](norm(s), norm(2 * s + 1)), torch.zeros(2), atol=1e-5, rtol=0)


def test_attention_kl_golden_value_and_identity():
    p = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # (N=1, heads=2, keys=3)
    q = torch.tensor([[[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]]])
    expected = (0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))) / 2
    torch.testing.assert_close(FEATURE_LOSSES["kl"](q, p), expected.reshape(1))
    torch.testing.assert_close(FEATURE_LOSSES["kl"](p, p), torch.zeros(1))


# ----------------------------------------------------------------------------------------------------------------
# Config: syntax, validation, round trip


def test_default_objective_is_logits_only():
    assert DistillationConfig(output_dir="x").objective == {"logits": {"signal": "logits", "weight": 1.0}}


def test_objective_forms_normalise_to_one_mapping():
    full = parse_objective({"hidden_states": {"weight": 0.5}})
    assert full["logits"] == {"signal": "logits", "weight": 1.0}
    assert full["hidden_states"] == {
        "signal": "hidden_states",
        "weight": 0.5,
        "loss": "mse",
        "layer_mapper": "auto",  # source for a pruned student, else uniform_last
        "layer_mapper_kwargs": {},
        "projector": "linear",
        "projector_kwargs": {},
        "norm": "layer_norm",
    }
    assert parse_objective({"hidden_states": 0.5}) == full
    assert parse_objective([{"signal": "hidden_states", "weight": 0.5}]) == full
    assert parse_objective(json.dumps({"hidden_states": {"weight": 0.5}})) == full
    named = parse_objective(
        [{"signal": "hidden_states", "name": "last_cos", "loss": "cosine", "layer_mapper": "last"}, "x"][:1]
    )
    assert named["last_cos"]["signal"] == "hidden_states" and named["last_cos"]["loss"] == "cosine"
    assert parse_objective(full) == full  # canonical form is a fixed point


def test_bad_objectives_are_refused():
    with pytest.raises(ConfigError, match="weights sum to zero"):
        parse_objective({"logits": {"weight": 0}})
    with pytest.raises(ConfigError, match="weights sum to zero"):
        parse_objective({"logits": 0, "hidden_states": 0})
    with pytest.raises(ConfigError, match="weight must be a finite number >= 0"):
        parse_objective({"hidden_states": -1})
    with pytest.raises(ConfigError, match="configured by the top-level --loss"):
        parse_objective({"logits": {"loss": "mse"}})
    with pytest.raises(ConfigError, match="'hidden' is not a signal"):
        parse_objective({"hidden": {"weight": 1}})
    with pytest.raises(ConfigError, match="unknown fields \\['mapper'\\]"):
        parse_objective({"hidden_states": {"mapper": "last"}})
    with pytest.raises(ConfigError, match="Known layer mappers"):
        parse_objective({"hidden_states": {"layer_mapper": "last_3"}})
    with pytest.raises(ConfigError, match="take no projector or norm"):
        parse_objective({"attentions": {"projector": "linear"}})
    with pytest.raises(ConfigError, match=r"Unknown feature loss 'huber'.*Known feature losses: cosine, kl, mse"):
        parse_objective({"hidden_states": {"loss": "huber"}})


def test_objective_round_trips_through_the_saved_config(tmp_path):
    objective = {"logits": 0.5, "hidden_states": {"layer_mapper": "last_k", "layer_mapper_kwargs": {"k": 2}}}
    config = DistillationConfig(output_dir=str(tmp_path), objective=objective, projector_learning_rate=1e-3)
    flat = config_to_dict(config)
    import yaml

    reloaded = yaml.safe_load(yaml.safe_dump(flat))
    (again,) = configs_from_dict(reloaded, classes=(DistillationConfig,))
    assert again.objective == config.objective
    assert again.objective["hidden_states"]["layer_mapper_kwargs"] == {"k": 2}
    assert again.projector_learning_rate == 1e-3


def test_cli_dotted_flags_and_yaml(tmp_path):
    (config_file := tmp_path / "run.yaml").write_text(
        "output_dir: out\nobjective:\n  hidden_states: {weight: 0.5, projector: orthogonal}\n"
    )
    configs = parse_with_yaml(
        [
            "--config",
            str(config_file),
            "--objective.hidden_states.weight",
            "2",
            "--objective.hidden_states.layer_mapper_kwargs.k=3",
            "--objective.hidden_states.layer_mapper",
            "last_k",
            "--objective.logits.weight",
            "0",
        ]
    )
    config = next(c for c in configs if isinstance(c, DistillationConfig))
    hidden = config.objective["hidden_states"]
    assert hidden["weight"] == 2.0 and hidden["projector"] == "orthogonal"  # the YAML's projector is kept
    assert hidden["layer_mapper"] == "last_k" and hidden["layer_mapper_kwargs"] == {"k": 3}
    assert config.objective["logits"]["weight"] == 0.0
    configs = parse_with_yaml(
        ["--output_dir", "o", "--objective", '{"attentions": {}}', "--objective.attentions.weight", "0.1"]
    )
    config = next(c for c in configs if isinstance(c, DistillationConfig))
    assert config.objective["attentions"]["weight"] == 0.1 and config.objective["attentions"]["loss"] == "kl"


# ----------------------------------------------------------------------------------------------------------------
# Trainer


def random_blocks(rows: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(3, TINY_VOCAB, (rows, SEQ), generator=generator).tolist()})


def make_config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seq_len=SEQ,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def make_pair(student_layers: int = 2, **student_overrides):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config())
    if student_overrides:
        student = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=student_layers, **student_overrides))
    else:
        student = build_student(teacher, {"num_hidden_layers": student_layers})
    return teacher, student


def loss_of(trainer, batch_rows=4, training=True):
    batch = trainer.data_collator([{"input_ids": row} for row in random_blocks(batch_rows)["input_ids"]])
    trainer.model.train(training)
    with torch.set_grad_enabled(training):
        return trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_hidden_state_loss_equals_the_formula(tmp_path, chunked):
    """Hidden states only, identity projector, MSE: mean over pairs of the mean per-token MSE between layers."""
    teacher, student = make_pair(2)
    objective = {
        "logits": 0,
        "hidden_states": {
            "projector": "identity",
            "norm": "none",
            "layer_mapper": "indices",
            "layer_mapper_kwargs": {"pairs": [[1, 1], [1, 3]]},
        },
    }
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, objective=objective, chunked_loss=chunked)
    )
    loss = loss_of(trainer)
    batch = trainer.data_collator([{"input_ids": row} for row in random_blocks(4)["input_ids"]])
    with torch.no_grad():
        s = student(batch["input_ids"], output_hidden_states=True).hidden_states  # [i] = layer i (i < last)
        t = teacher(batch["input_ids"], output_hidden_states=True).hidden_states
    mse = lambda a, b: (a[:, :-1] - b[:, :-1]).pow(2).mean(-1).mean()  # noqa: E731 (every token is real)
    expected = (mse(s[1], t[1]) + mse(s[1], t[3])) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.model.layers[0].parameters())


def test_chunked_and_plain_paths_agree_with_hidden_states(tmp_path):
    objective = {"hidden_states": {"weight": 0.7, "layer_mapper": "all", "loss": "cosine", "norm": "layer_norm"}}
    losses = []
    for chunked in ("true", "false"):
        teacher, student = make_pair(2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=make_config(tmp_path, objective=objective, chunked_loss=chunked)
        )
        losses.append(loss_of(trainer).detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_hidden_states_only_training_never_runs_a_head(tmp_path, chunked):
    """Without logit terms (logits weight 0, training) neither path applies the student's or the teacher's head to
    the real tokens: the loss is the feature term alone."""
    teacher, student = make_pair(2)
    hidden = {
        "projector": "identity",
        "norm": "none",
        "layer_mapper": "indices",
        "layer_mapper_kwargs": {"pairs": [[1, 3]]},
    }
    objective = {"logits": 0, "hidden_states": hidden}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, objective=objective, chunked_loss=chunked)
    )
    rows = []
    hooks = [m.lm_head.register_forward_hook(lambda mod, a, out: rows.append(out.shape[1])) for m in (student, teacher)]
    try:
        loss = loss_of(trainer)
    finally:
        for hook in hooks:
            hook.remove()
    # The plain path's forward computes the student's logits (unused); the chunked path one position's only.
    assert rows == ([1] if chunked == "true" else [SEQ])
    batch = trainer.data_collator([{"input_ids": row} for row in random_blocks(4)["input_ids"]])
    with torch.no_grad():
        s = student(batch["input_ids"], output_hidden_states=True).hidden_states[1]  # [i] = layer i (i < last)
        t = teacher(batch["input_ids"], output_hidden_states=True).hidden_states[3]
    expected = (s[:, :-1] - t[:, :-1]).pow(2).mean(-1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_narrow_student_trains_with_linear_projection(tmp_path):
    """A 64-wide student learns from a 128-wide teacher through linear projectors, with the student's optimizer."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256))
    student = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    objective = {"hidden_states": {"weight": 1.0, "projector": "linear", "layer_mapper": "uniform_last"}}
    config = make_config(tmp_path, objective=objective, max_steps=4, projector_learning_rate=5e-3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(16))
    projectors = trainer.intermediate.projectors["hidden_states"]
    assert len(projectors) == 2 and projectors[0].proj.weight.shape == (128, 64)
    before = copy.deepcopy(trainer.intermediate.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_hidden_states" in entry]
    assert len(logs) == 4 and all(entry["loss_hidden_states"] > 0 and "loss_kd" in entry for entry in logs)
    groups = trainer.optimizer.param_groups
    projector_group = next(g for g in groups if any(p is projectors[0].proj.weight for p in g["params"]))
    assert projector_group["initial_lr"] == 5e-3
    for name, value in before.items():
        assert not torch.equal(trainer.intermediate.state_dict()[name], value), name
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())
    # The teacher's mapped layers are the only ones captured; the exported student holds no projector weights.
    assert trainer.intermediate.layers("teacher", "hidden_states") == {2, 4}
    trainer.save_model(str(tmp_path / "export"))
    keys = load_file(str(tmp_path / "export" / "model.safetensors")).keys()
    assert set(keys) == set(student.state_dict()) - {"lm_head.weight"} | {"lm_head.weight"} & set(keys)
    assert not any(key.startswith(("projectors", "hidden_states")) for key in keys)


def test_attention_kl_is_zero_for_a_copy_and_switches_to_eager(tmp_path):
    teacher, _ = make_pair(4)
    student = copy.deepcopy(teacher)
    objective = {"logits": 0, "attentions": {"layer_mapper": "all"}}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, objective=objective))
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "eager"
    loss = loss_of(trainer, training=False)
    assert abs(float(loss)) < 1e-6
    with torch.no_grad():
        student.model.layers[0].self_attn.q_proj.weight.mul_(30.0)
    assert float(loss_of(trainer, training=False)) > 1e-3


def test_attention_maps_from_sdpa_explain_the_fix(tmp_path):
    teacher, student = make_pair(2)
    objective = {"attentions": {"layer_mapper": "last"}}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, objective=objective))
    student.set_attn_implementation("sdpa")  # e.g. switched back after the trainer was built
    with pytest.raises(ConfigError, match="attn_implementation='eager'"):
        loss_of(trainer)


def test_hidden_states_need_a_teacher(tmp_path):
    _, student = make_pair(2)
    config = make_config(tmp_path, alpha=0.0, objective={"hidden_states": 1.0})
    with pytest.raises(ValueError, match="no teacher_model was given"):
        DistillationTrainer(model=student, teacher_model=None, args=config)


def test_eval_reports_perplexity_and_components_with_hidden_states_only(tmp_path):
    teacher, student = make_pair(2)
    objective = {"logits": 0, "hidden_states": 1.0}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, objective=objective),
        eval_dataset=random_blocks(8),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_student_ppl"] > 1 and metrics["eval_teacher_ppl"] > 1 and metrics["eval_loss"] > 0


def test_resume_restores_projector_weights_exactly(tmp_path):
    common = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        seed=3,
        objective={"hidden_states": {"weight": 1.0, "projector": "mlp", "layer_mapper": "all"}},
    )
    data = random_blocks(40)

    teacher, student = make_pair(2)
    full = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path / "full", **common), train_dataset=data
    )
    full.train()
    expected = copy.deepcopy(full.intermediate.state_dict())
    expected_student = copy.deepcopy(student.state_dict())
    saved = load_file(str(tmp_path / "full" / "out" / "checkpoint-6" / "projectors.safetensors"))
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(saved[name], value), name

    teacher, student = make_pair(2)  # fresh projectors too
    config = make_config(tmp_path / "full", **common)
    resumed = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-4"
    at_4 = load_file(str(checkpoint / "projectors.safetensors"))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert not torch.equal(at_4[next(iter(at_4))], expected[next(iter(at_4))])
    for name, value in expected.items():
        torch.testing.assert_close(resumed.intermediate.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in expected_student.items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)


def test_resume_without_projectors_is_an_error(tmp_path):
    teacher, student = make_pair(2)
    config = make_config(tmp_path, objective={"hidden_states": 1.0})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=random_blocks(8))
    (empty := tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ConfigError, match="projectors' weights"):
        trainer.train(resume_from_checkpoint=str(empty))
