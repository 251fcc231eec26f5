"""Structured pruning: hand-computed importance, exact cuts (identity, pruned == teacher with the cut units zeroed),
GQA, GPT-2's Conv1D layout, the errors, save/load and GGUF round trips, the CLI and --student_init prune."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import distily
from distily.errors import ConfigError, PruneError
from distily.pruning import PruneReport, Stat, family_of, measure_importance, prune, resolve_target

from .conftest import TINY_VOCAB, tiny_gpt2_config, tiny_llama_config


def calibration(blocks: int = 8, tokens: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (blocks, tokens), generator=generator)


def llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def zeroed_llama(teacher: LlamaForCausalLM, kept: dict) -> LlamaForCausalLM:
    """The teacher with every unit the plan cut set to zero (an independent reference for the cut model)."""
    import copy

    model = copy.deepcopy(teacher)
    config = teacher.config
    head_dim = config.head_dim
    hidden = torch.ones(config.hidden_size, dtype=torch.bool)
    hidden[kept["channels"]] = False  # True: cut
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            if index not in kept["layers"]:
                attention.o_proj.weight.zero_()  # the block adds nothing to the residual stream: identity
                mlp.down_proj.weight.zero_()
                continue
            position = kept["layers"].index(index)
            for head in range(config.num_attention_heads):
                if head not in kept["query_heads"][position]:
                    attention.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
            cut_neurons = [n for n in range(config.intermediate_size) if n not in kept["neurons"][position]]
            mlp.down_proj.weight[:, cut_neurons] = 0
            attention.o_proj.weight[hidden] = 0
            mlp.down_proj.weight[hidden] = 0
            layer.input_layernorm.weight[hidden] = 0
            layer.post_attention_layernorm.weight[hidden] = 0
        model.model.embed_tokens.weight[:, hidden] = 0
        model.model.norm.weight[hidden] = 0
        model.lm_head.weight[:, hidden] = 0
    return model


# ----------------------------------------------------------------------------------------------------------------
# Importance


def test_aggregations_match_hand_computed_values():
    stat = Stat(2)
    stat.update(torch.tensor([[1.0, 2.0], [-3.0, 2.0]]))
    assert stat.score("mean").tolist() == [2.0, 2.0]
    assert stat.score("l2").tolist() == pytest.approx([math.sqrt(5), 2.0])
    assert stat.score("variance").tolist() == pytest.approx([4.0, 0.0])  # (1 + 9)/2 − (−1)²; constant → 0


def test_head_scores_are_the_norm_of_each_heads_residual_write():
    teacher, ids = llama(), calibration()
    config = teacher.config
    seen = []
    handle = teacher.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    logits(teacher, ids)
    handle.remove()
    x = torch.cat(seen).reshape(-1, config.num_attention_heads, config.head_dim)
    weight = teacher.model.layers[1].self_attn.o_proj.weight
    expected = [
        torch.stack([(weight[:, h * 8 : (h + 1) * 8] @ x[t, h]).norm() for t in range(len(x))]).mean().item()
        for h in range(config.num_attention_heads)
    ]  # by hand: one token, one head at a time
    importance = measure_importance(teacher, family_of(config), ids, progress=False)
    assert importance.heads("mean")[1].tolist() == pytest.approx(expected, rel=1e-5)
    assert importance.tokens == ids.numel()


def test_a_head_neuron_and_channel_that_write_nothing_score_zero_and_are_cut_first():
    teacher, ids = llama(), calibration()
    with torch.no_grad():
        teacher.model.layers[0].self_attn.o_proj.weight[:, 8:16] = 0  # head 1 of layer 0 writes nothing
        teacher.model.layers[2].mlp.up_proj.weight[5] = 0  # neuron 5 of layer 2 is always 0
        channel = 7  # nothing ever writes channel 7 of the residual stream
        teacher.model.embed_tokens.weight[:, channel] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[channel] = 0
            layer.mlp.down_proj.weight[channel] = 0
    importance = measure_importance(teacher, family_of(teacher.config), ids, progress=False)
    for aggregation in ("mean", "l2", "variance"):
        assert importance.heads(aggregation)[0, 1] == 0
        assert importance.neurons(aggregation)[2, 5] == 0
        assert importance.channels(aggregation)[channel] == 0
        assert (importance.heads(aggregation)[0] > 0).sum() == 3
    # One head less per group, one neuron and one channel less: exactly those go.
    _, report = prune(
        teacher, {"num_attention_heads": 2, "intermediate_size": 63, "hidden_size": 30}, ids, progress=False
    )
    kept = report.kept
    assert 1 not in kept["query_heads"][0] and 0 in kept["query_heads"][0]  # head 0 is head 1's group partner
    assert 5 not in kept["neurons"][2] and len(kept["neurons"][2]) == 63
    assert channel not in kept["channels"] and len(kept["channels"]) == 30


def test_a_layer_that_is_the_identity_scores_zero_on_both_layer_scores_and_is_dropped_first():
    teacher, ids = llama(), calibration()
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    importance = measure_importance(teacher, family_of(teacher.config), ids, layer_loss_blocks=4, progress=False)
    assert importance.block_importance[2].item() == pytest.approx(0, abs=1e-6)
    assert importance.drop_loss[2].item() == pytest.approx(0, abs=1e-6)
    assert (importance.block_importance[[0, 1, 3]] > 1e-3).all()
    # The drop loss is the loss with the layer skipped minus the full model's, by a second forward pass.
    import copy

    skipped = copy.deepcopy(teacher)  # layer 1 made the identity: the model without it
    with torch.no_grad():
        skipped.model.layers[1].self_attn.o_proj.weight.zero_()
        skipped.model.layers[1].mlp.down_proj.weight.zero_()
    first = ids[:4]
    full = teacher(input_ids=first, labels=first).loss.item()
    without_1 = skipped(input_ids=first, labels=first).loss.item()
    assert importance.base_loss == pytest.approx(full, rel=1e-5)
    assert importance.drop_loss[1].item() == pytest.approx(without_1 - full, rel=1e-4, abs=1e-6)
    _, report = prune(teacher, {"num_hidden_layers": 3}, ids, layer_score="block_importance", progress=False)
    assert report.kept["layers"] == [0, 1, 3]
    # By drop loss (the default) the layer whose removal hurts least goes (in a random model, removing one may
    # even help).
    _, report = prune(teacher, {"num_hidden_layers": 3}, ids, progress=False)
    least = int(importance.drop_loss.argmin())
    assert report.kept["layers"] == [i for i in range(4) if i != least]


# ----------------------------------------------------------------------------------------------------------------
# Exact cuts


def test_pruning_to_the_teachers_own_shape_is_the_identity():
    teacher, ids = llama(), calibration()
    model, report = prune(teacher, {"num_hidden_layers": 4, "hidden_size": 32}, ids, progress=False)
    assert torch.equal(logits(model.eval(), ids), logits(teacher, ids))
    assert report.kept["layers"] == [0, 1, 2, 3] and report.kept["channels"] == list(range(32))


@pytest.mark.parametrize(
    "target",
    [
        {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
        {"num_attention_heads": 2, "num_key_value_heads": 1},  # a whole key/value group goes
        {"hidden_size": 20, "intermediate_size": 17},
    ],
)
@pytest.mark.parametrize("tied", [False, True])
def test_a_pruned_model_equals_the_teacher_with_the_cut_units_zeroed(target, tied):
    teacher, ids = llama(tie_word_embeddings=tied), calibration()
    model, report = prune(teacher, target, ids, progress=False)
    reference = zeroed_llama(teacher, report.kept)
    difference = (logits(model.eval(), ids) - logits(reference, ids)).abs().max().item()
    assert difference < 1e-5
    assert (logits(model, ids) - logits(teacher, ids)).abs().max() > 1e-3  # it really cut something


def test_gqa_shapes_and_explicit_head_dim():
    teacher = llama(num_attention_heads=8, num_key_value_heads=4, hidden_size=32, head_dim=4)
    model, report = prune(
        teacher, {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 24}, calibration(), progress=False
    )
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 24) and attention.k_proj.weight.shape == (8, 24)
    assert attention.o_proj.weight.shape == (24, 16)
    assert model.config.head_dim == 4 and model.config.hidden_size == 24  # 24 ≠ 4 heads × 4
    for layer, queries in zip(report.kept["kv_heads"], report.kept["query_heads"], strict=True):
        # each kept query head stays with its own key/value head: 2 per kept group, groups of 2 in the teacher
        assert [q // 2 for q in queries] == [g for g in layer for _ in range(2)]
    reference = zeroed_llama(teacher, report.kept)
    assert (logits(model.eval(), calibration()) - logits(reference, calibration())).abs().max() < 1e-5


def test_gpt2_conv1d_layers_and_neurons_are_exact_and_heads_with_hidden_cut_together():
    teacher, ids = gpt2(n_inner=64), calibration()
    model, report = prune(teacher, {"n_layer": 3, "n_inner": 40}, ids, progress=False)
    import copy

    reference = copy.deepcopy(teacher)
    kept = report.kept
    with torch.no_grad():
        for index, block in enumerate(reference.transformer.h):
            if index not in kept["layers"]:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()
                continue
            cut = [n for n in range(64) if n not in kept["neurons"][kept["layers"].index(index)]]
            block.mlp.c_proj.weight[cut] = 0  # Conv1D weights are (in, out): a neuron is a row
    assert (logits(model.eval(), ids) - logits(reference, ids)).abs().max() < 1e-5
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 40)

    model, report = prune(teacher, {"n_head": 2}, ids, progress=False)  # hidden follows: 2 heads × 8
    assert model.config.n_embd == 16 and model.transformer.h[0].attn.c_attn.weight.shape == (16, 48)
    assert len(report.kept["channels"]) == 16 and torch.isfinite(logits(model.eval(), ids)).all()


# ----------------------------------------------------------------------------------------------------------------
# Errors, all before any work


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"num_hidden_layers": 5}, "deeper than the teacher"),
        ({"hidden_size": 64}, "wider than the teacher"),
        ({"num_attention_heads": 3}, "cannot be split evenly"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "cannot join another group"),
        ({"vocab_size": 64}, "not a size pruning can cut"),
        ({"hidden_size": 0}, "whole number ≥ 1"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple of num_attention_heads"),
    ],
)
def test_bad_targets_are_clear_errors(target, message):
    with pytest.raises((PruneError, ConfigError), match=message):
        resolve_target(llama().config, family_of(llama().config), target)


def test_gpt2_hidden_size_the_layernorms_cannot_take_and_other_architectures_are_errors():
    config = tiny_gpt2_config()
    with pytest.raises(PruneError, match="LayerNorms and attention take hidden_size"):
        resolve_target(config, family_of(config), {"n_embd": 20})
    from transformers import OPTConfig

    with pytest.raises(PruneError, match="supports the model types llama, mistral, qwen2, qwen3, gpt2"):
        family_of(OPTConfig())


def test_too_few_calibration_tokens_is_an_error():
    with pytest.raises(PruneError, match="too few to rank"):
        prune(llama(), {"num_hidden_layers": 2}, calibration(blocks=2, tokens=64), progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Save/load, GGUF


def test_a_pruned_model_saves_and_loads_and_its_report_reads_back(tmp_path):
    teacher, ids = llama(), calibration()
    model, report = prune(teacher, {"hidden_size": 24, "num_attention_heads": 2}, ids, progress=False)
    model.save_pretrained(tmp_path)
    report.write(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, ids), logits(model.eval(), ids))
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 8
    back = PruneReport.read(tmp_path).data
    assert back["kept"] == report.kept and back["calibration"]["tokens"] == ids.numel()
    assert len(back["scores"]["heads"]) == 4 and len(back["scores"]["layers"]["drop_loss"]) == 4


def test_gguf_of_a_pruned_model_runs_in_llama_cpp_and_matches_pytorch(tmp_path):
    pytest.importorskip("llama_cpp")
    from distily.export import export

    from .conftest import BYTE_VOCAB, make_byte_bpe_tokenizer
    from .test_export import LOGIT_ATOL, assert_same_top1, llama_cpp_logits, token_ids, torch_logits, trained

    tokenizer = make_byte_bpe_tokenizer()
    teacher = trained(llama(vocab_size=BYTE_VOCAB), tokenizer)
    ids = calibration(tokens=64) % BYTE_VOCAB
    # hidden 24 is no longer 2 heads × head_dim 8: llama.cpp must read the key/value lengths from the file
    model, _ = prune(
        teacher, {"hidden_size": 24, "num_attention_heads": 2, "num_hidden_layers": 3}, ids, progress=False
    )
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "pruned.gguf"
    export(folder, ["gguf"], "f32", path)
    text_ids = token_ids(tokenizer)
    reference = torch_logits(model.eval(), text_ids)
    out = llama_cpp_logits(path, text_ids)
    assert np.abs(out - reference).max() < LOGIT_ATOL["f32"]
    assert_same_top1(reference, out, LOGIT_ATOL["f32"])


def test_prune_is_public():
    assert distily.prune is prune


# ----------------------------------------------------------------------------------------------------------------
# `distily prune` and --student_init prune

TARGET = '{"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 48}'


def prune_args(teacher, corpus, out, *extra):
    return [
        "prune",
        "--teacher", str(teacher),
        "--dataset", str(corpus),
        "--dataset_cache_dir", str(out.parent / "cache"),
        "--seq_len", "32",
        "--calibration_blocks", "8",
        "--target", TARGET,
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def test_prune_command_writes_a_loadable_model_and_its_report(tiny_teacher_dir, text_corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    from distily.cli import main

    out = tmp_path / "pruned"
    assert main(prune_args(tiny_teacher_dir, text_corpus, out)) == 0
    assert "Pruned" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.head_dim) == (3, 24, 8)
    assert AutoTokenizer.from_pretrained(out)("def f(x):")["input_ids"]
    report = json.loads((out / "distily_prune.json").read_text())
    assert report["data"]["split"] == "train" and len(report["data"]["block_rows"]) == 8
    assert report["calibration"]["tokens"] == 8 * 32 and len(report["calibration"]["fingerprint"]) == 64
    assert report["kept"]["layers"] == model.config.distily_init["teacher_layers"]
    assert len(report["scores"]["neurons"]) == 4 and len(report["scores"]["neurons"][0]) == 64
    assert report["command"] and report["target"]["hidden_size"] == 24
    # The same command again refuses to write over the folder.
    assert main(prune_args(tiny_teacher_dir, text_corpus, out)) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", '{"num_hidden_layers": 9}'], "deeper than the teacher"),
        (["--target", '{"num_attention_heads": 3}'], "cannot be split evenly"),
        (["--target", '{"rope_theta": 1.0}'], "not a size pruning can cut"),
        (["--calibration_blocks", "100000"], "more calibration blocks than the train split"),
        (["--calibration_blocks", "2"], "too few to rank"),
    ],
)
def test_prune_command_errors_write_nothing(tiny_teacher_dir, text_corpus, tmp_path, capsys, extra, message):
    from distily.cli import main

    out = tmp_path / "pruned"
    assert main([*prune_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def train_args(teacher, corpus, out, student_config, *extra):
    return [
        "--teacher", str(teacher),
        "--student_init", "prune",
        "--student_config", student_config,
        "--calibration_blocks", "8",
        "--dataset", str(corpus),
        "--dataset_cache_dir", str(out.parent / "cache"),
        "--output_dir", str(out),
        "--seq_len", "32",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--report_to", "none",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_student_init_prune_trains_and_resumes_to_the_uninterrupted_weights(tiny_teacher_dir, text_corpus, tmp_path):
    from safetensors.torch import load_file

    from distily.cli import main

    out = tmp_path / "run"
    args = train_args(tiny_teacher_dir, text_corpus, out, TARGET)
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 24, 48)
    assert config["distily_init"]["pruned"] and len(config["distily_init"]["calibration"]["train_rows"]) == 8
    # The run writes distily_prune.json beside the student, as `distily prune` does.
    report = json.loads((out / "distily_prune.json").read_text())
    assert report["kept"]["layers"] == config["distily_init"]["teacher_layers"]
    assert report["data"]["block_rows"] == config["distily_init"]["calibration"]["train_rows"]
    assert report["calibration"]["fingerprint"] == config["distily_init"]["calibration"]["fingerprint"]
    manifest = json.loads((out / "distily_run.json").read_text())
    assert report["command"] == manifest["command"] and report["teacher"] == str(tiny_teacher_dir)
    uninterrupted = load_file(out / "model.safetensors")
    manifest = json.loads((out / "distily_run.json").read_text())
    manifest["status"] = "running"
    (out / "distily_run.json").write_text(json.dumps(manifest))
    (out / "model.safetensors").unlink()
    (out / "checkpoint-3").rename(out / "checkpoint-3-partial")
    assert main([*args, "--resume_from_checkpoint", "true"]) == 0
    resumed = load_file(out / "model.safetensors")
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_pruned_student_starts_where_the_pruned_teacher_is(tiny_teacher_dir, text_corpus, tmp_path):
    """The run's step-0 student is exactly distily.prune's model on the same calibration blocks."""
    from distily.cli import main
    from distily.config import DataArguments
    from distily.pruning.calibration import calibration_blocks
    from distily.teacher.loading import load_teacher

    out = tmp_path / "run"
    assert main(train_args(tiny_teacher_dir, text_corpus, out, TARGET, "--max_steps", "0")) == 0
    teacher, tokenizer = load_teacher(str(tiny_teacher_dir), dtype="float32")
    data = DataArguments(dataset=str(text_corpus), dataset_cache_dir=str(tmp_path / "cache"))
    ids, _ = calibration_blocks(data, tokenizer, 32, 8, 42, "--calibration_blocks")
    expected, _ = prune(teacher, json.loads(TARGET), ids, progress=False)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(saved, ids), logits(expected.eval(), ids))


@pytest.mark.parametrize(
    ("student_config", "extra"),
    [
        (TARGET, ["--lora_r", "4"]),
        ('{"num_hidden_layers": 3, "intermediate_size": 48, "bitnet": true}', []),
        (TARGET, ["--objective", '{"logits": {"weight": 1.0}, "hidden_states": {"weight": 1.0}}']),
    ],
    ids=["lora", "bitnet", "hidden_states"],
)
def test_a_pruned_student_trains_with_lora_bitnet_and_hidden_state_objectives(
    tiny_teacher_dir, text_corpus, tmp_path, student_config, extra
):
    from distily.cli import main

    out = tmp_path / "run"
    assert main(train_args(tiny_teacher_dir, text_corpus, out, student_config, "--save_strategy", "no", *extra)) == 0
    manifest = json.loads((out / "distily_run.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 3
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["eval_student_ppl"])


def test_the_source_mapper_pairs_each_pruned_layer_with_the_teacher_layer_it_came_from():
    from distily.config import ObjectiveComponent
    from distily.features import IntermediateObjective
    from distily.layer_mappers import map_layers

    assert map_layers("source", 4, 30, {"layers": [0, 10, 19, 29]}) == [(1, 1), (2, 11), (3, 20), (4, 30)]
    teacher = llama()
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1 is the identity: it is the one dropped
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    # block importance: an identity layer scores exactly 0 (by drop loss a random model's layer may even help)
    student, _ = prune(
        teacher, {"num_hidden_layers": 3, "hidden_size": 24}, calibration(), layer_score="block_importance",
        progress=False,
    )  # fmt: skip
    component = ObjectiveComponent(name="hidden_states", signal="hidden_states", layer_mapper="source")
    objective = IntermediateObjective([component], student, teacher)
    assert objective.pairs["hidden_states"] == [(1, 1), (2, 3), (3, 4)]
    with pytest.raises(ConfigError, match="one teacher layer per student layer"):
        IntermediateObjective([component], llama(num_hidden_layers=2), teacher)  # a random student records none
    # The default mapper (auto) pairs a pruned student by origin too, and a layer subset as uniform_last does.
    default = ObjectiveComponent(name="hidden_states", signal="hidden_states")
    assert default.layer_mapper == "auto"
    assert IntermediateObjective([default], student, teacher).pairs["hidden_states"] == [(1, 1), (2, 3), (3, 4)]
    subset = distily.build_student(teacher, {"num_hidden_layers": 2})
    assert subset.config.distily_init["teacher_layers"] == [0, 3]
    assert IntermediateObjective([default], subset, teacher).pairs["hidden_states"] == [(1, 2), (2, 4)]
    assert IntermediateObjective([component], subset, teacher).pairs["hidden_states"] == [(1, 1), (2, 4)]


def test_iterative_pruning_composes_each_layers_origin_through_the_rounds():
    """Round two cuts round one's student; its record names round one's layers and the original teacher's."""
    from distily.config import ObjectiveComponent
    from distily.features import IntermediateObjective
    from distily.layer_mappers import student_source_layers

    teacher = llama(num_hidden_layers=6)
    first, _ = prune(teacher, {"num_hidden_layers": 4}, calibration(), teacher_layers=[0, 2, 3, 5], progress=False)
    second, _ = prune(first, {"num_hidden_layers": 2}, calibration(), teacher_layers=[1, 3], progress=False)
    record = second.config.distily_init
    assert record["teacher_layers"] == [1, 3] and record["teacher_num_hidden_layers"] == 4
    assert record["ancestors"] == [{"num_hidden_layers": 6, "layers": [2, 5]}]
    assert student_source_layers(second, 4) == [1, 3] and student_source_layers(second, 6) == [2, 5]
    assert student_source_layers(second, 5) == []  # no model of the chain has 5 layers
    # A third round composes through both.
    third, _ = prune(second, {"num_hidden_layers": 1}, calibration(), teacher_layers=[1], progress=False)
    assert third.config.distily_init["ancestors"] == [
        {"num_hidden_layers": 4, "layers": [3]},
        {"num_hidden_layers": 6, "layers": [5]},
    ]
    # Distilled from the original teacher, the default mapper pairs round two's layers with their origin there;
    # distilled from round one's student, with theirs in it.
    component = ObjectiveComponent(name="h", signal="hidden_states")
    assert IntermediateObjective([component], second, teacher).pairs["h"] == [(1, 3), (2, 6)]
    assert IntermediateObjective([component], second, first).pairs["h"] == [(1, 2), (2, 4)]
    # The record survives save and load, as a trained round's run folder keeps it.
    assert json.loads(second.config.to_json_string())["distily_init"]["ancestors"] == record["ancestors"]


def test_a_pruned_student_trains_from_a_recorded_teacher(tiny_teacher_dir, text_corpus, tmp_path):
    from distily.cli import main

    cache, data = tmp_path / "cache-teacher", ["--dataset", str(text_corpus), "--max_eval_blocks", "4"]
    record = ["record", "--teacher", str(tiny_teacher_dir), *data, "--seq_len", "32", "--top_k", "8"]
    assert main([*record, "--output", str(cache), "--device", "cpu"]) == 0
    run = ["--teacher_cache", str(cache), *data, "--student_init", "prune", "--student_config", TARGET]
    run += ["--calibration_blocks", "8", "--seq_len", "32", "--max_steps", "2", "--report_to", "none"]
    assert main([*run, "--use_cpu", "true", "--save_strategy", "no", "--output_dir", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["distily_init"]["pruned"] and config["hidden_size"] == 24


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "qwen3"])
def test_other_llama_family_models_prune_exactly(model_type):
    from transformers import AutoConfig

    values = tiny_llama_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = AutoConfig.for_model(
        model_type, **{key: values[key] for key in keep}, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False
    )
    if model_type == "qwen3":
        # Qwen3's per-head q/k norms share rms_norm_eps, so the cut keeps ε and matches the zeroed teacher only up
        # to ε's share of each norm (4e-4 in the logits at ε = 1e-6 and this tiny model's small activations); with
        # ε negligible, the rest of the cut (q/k norms untouched, every other rule) must be exact.
        config.rms_norm_eps = 1e-12
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    ids = calibration()
    target = {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40}
    model, report = prune(teacher, target, ids, progress=False)
    reference = zeroed_llama(teacher, report.kept)
    assert (logits(model.eval(), ids) - logits(reference, ids)).abs().max() < 1e-5
