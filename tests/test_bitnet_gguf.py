"""GGUF export of BitNet b1.58 students (ternary TQ2_0 / TQ1_0 tensors), run in llama.cpp's ``bitnet`` graph
through llama-cpp-python and compared with PyTorch on a fixed text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from distily import build_student
from distily.bitnet import fp16_bytes, load_bitnet_student, save_packed
from distily.cli import main
from distily.export import EXPORT_MANIFEST, ExportError, check_exportable, export
from distily.export.gguf import GGUF_OUTTYPES, write_gguf

from .conftest import BYTE_VOCAB, llama_cpp_build, make_byte_bpe_tokenizer, tiny_llama_config
from .llama_cpp_arithmetic import llama_cpp_arithmetic
from .test_export import TEXT, llama_cpp_logits, token_ids, torch_logits

# Widths: ALL_TERNARY has every projection row a multiple of 256 (every projection TQ); FALLBACK has
# hidden_size 320 (q/k/v/o/gate/up rows of 320 fall back to Q8_0) and intermediate_size 512 (ffn_down stays TQ).
ALL_TERNARY = {"hidden_size": 256, "intermediate_size": 512}
FALLBACK = {"hidden_size": 320, "intermediate_size": 512}

# Two comparisons, each bounding what the export guarantees (notes.md, "llama.cpp vs PyTorch on BitNet GGUFs"):
#
# 1. Kernel arithmetic. llama.cpp quantises activations its own way (Q8_K blocks of 256 for TQ tensors, Q8_0
#    blocks of 32 for Q8_0 ones, float16 for F16 ones; tests/llama_cpp_arithmetic.py), not per token as BitLinear
#    does. Against the student run with that arithmetic in PyTorch the file agrees up to float32 accumulation
#    order, which now and then moves an activation across a rounding boundary: measured on 14 trained students
#    (seeds 0-6, both widths; benchmarks/bitnet_gguf_kernels.py) p99 |Δlogit| ≤ 0.0062·σ, mean ≤ 0.0008·σ,
#    perplexity within 3e-4 (σ: the logits' standard deviation, 4-8 here). A wrong mapping (a scale, a norm, a
#    permutation) moves logits by about σ, fifty times the bound.
KERNEL_P99 = 0.02  # × σ
KERNEL_MEAN = 0.002  # × σ
KERNEL_PPL_REL = 1e-3
# 2. Quality against the student's own BitLinear forward: how much llama.cpp's block-wise activation rounding
#    changes this student. It depends on the trained student (so on the CPU that trained it, which is why one
#    maximum bound held on one machine and not on another): over the same 14 students max |Δlogit| 0.15-5.2, but
#    p95 ≤ 0.032·σ, perplexity within 1.1%, the top token the same at ≥ 96.9% of positions.
QUALITY_P95 = 0.1  # × σ
QUALITY_PPL_REL = 0.02
QUALITY_TOP1 = 0.95
NEAR_TIE = 0.05  # a position whose top-2 reference logits are closer than this may pick either token
# The same student with activation quantisation switched off in PyTorch is what an f32 GGUF computes in
# llama.cpp: measured max |Δlogit| 2e-5 to 7e-5 (float32 rounding), so the mapping itself is exact.
F32_NO_ACT_QUANT_MAX_ABS = 1e-3
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_bpe_tokenizer()


def bitnet_student(widths: dict, steps: int = 40):
    """A 2-layer BitNet student of a tied 4-layer Llama teacher, trained to memorise TEXT (confident logits)."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=BYTE_VOCAB, tie_word_embeddings=True, **widths)
    teacher = LlamaForCausalLM(config).eval()
    student = build_student(teacher, {"num_hidden_layers": 2, "bitnet": True})
    ids = torch.tensor([token_ids(make_byte_bpe_tokenizer())])
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.train()
    for _ in range(steps):
        loss = student(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


@pytest.fixture(scope="module", params=["all_ternary", "fallback"])
def student_dir(request, tokenizer, tmp_path_factory):
    """A trained BitNet student saved the way a run folder holds it (latent weights), per width setting."""
    student = bitnet_student(ALL_TERNARY if request.param == "all_ternary" else FALLBACK)
    folder = tmp_path_factory.mktemp(f"bitnet-{request.param}")
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    log_probs = torch.tensor(logits[:-1]).log_softmax(-1)
    return math.exp(-log_probs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item())


def assert_same_top1_unless_near_tie(reference: np.ndarray, other: np.ndarray) -> None:
    """The top token is the same at every position whose top-2 reference logits are more than NEAR_TIE apart."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > NEAR_TIE
    agree = reference.argmax(-1) == other.argmax(-1)
    assert np.all(agree | ~decided), np.nonzero(~agree & decided)
    assert decided.mean() >= 0.9  # the comparison is not vacuous (measured: 93% and >95% decided)


def assert_llama_cpp_kernels(student, path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for ``path`` are the student's under llama.cpp's own arithmetic; returns them."""
    logits = llama_cpp_logits(path, ids)
    with llama_cpp_arithmetic(student, gguf_types(path)):
        emulated = torch_logits(student, ids)
    difference, sigma = np.abs(logits - emulated), float(emulated.std())
    where = f"{llama_cpp_build()}; p99 {np.percentile(difference, 99):.4f}, mean {difference.mean():.5f}, σ {sigma:.2f}"
    assert np.percentile(difference, 99) < KERNEL_P99 * sigma, where
    assert difference.mean() < KERNEL_MEAN * sigma, where
    assert perplexity(logits, ids) == pytest.approx(perplexity(emulated, ids), rel=KERNEL_PPL_REL), where
    assert_same_top1_unless_near_tie(emulated, logits)
    return logits


def assert_ternary_quality(reference: np.ndarray, logits: np.ndarray, ids: list[int]) -> None:
    """The file's logits are close to the student's own BitLinear forward (``reference``)."""
    difference, sigma = np.abs(logits - reference), float(reference.std())
    where = f"{llama_cpp_build()}; p95 {np.percentile(difference, 95):.4f}, σ {sigma:.2f}"
    assert np.percentile(difference, 95) < QUALITY_P95 * sigma, where
    assert perplexity(logits, ids) == pytest.approx(perplexity(reference, ids), rel=QUALITY_PPL_REL), where
    assert (reference.argmax(-1) == logits.argmax(-1)).mean() >= QUALITY_TOP1, where


def gguf_types(path) -> dict[str, str]:
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def gguf_fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: reader.fields[key].contents() for key in reader.fields if not key.startswith("GGUF.")}


@pytest.mark.parametrize("outtype", ["tq2_0", "tq1_0"])
def test_tq_gguf_runs_in_llama_cpp_bitnet_and_matches_pytorch(student_dir, tmp_path, tokenizer, outtype):
    path = tmp_path / f"student-{outtype}.gguf"
    result = export(student_dir, ["gguf"], outtype, path)
    assert result.files["gguf"] == [path]

    # Stored as asked: every projection ternary (or the documented fallback), γ as an f32 `.scale`.
    types = gguf_types(path)
    hidden = json.loads((student_dir / "config.json").read_text())["hidden_size"]
    ternary = outtype.upper()
    for layer in range(2):
        for name in PROJECTIONS:
            rows_fit = (hidden if name != "ffn_down" else 512) % 256 == 0
            assert types[f"blk.{layer}.{name}.weight"] == (ternary if rows_fit else "Q8_0"), name
            assert types[f"blk.{layer}.{name}.scale"] == "F32"
        assert types[f"blk.{layer}.attn_sub_norm.weight"] == types[f"blk.{layer}.ffn_sub_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "F16" and "output.weight" not in types  # tied: llama.cpp reuses token_embd
    fields = gguf_fields(path)
    assert fields["general.architecture"] == "bitnet" and fields["bitnet.block_count"] == 2
    assert fields["general.file_type"] == GGUF_OUTTYPES[outtype].file_type

    student = load_bitnet_student(student_dir)  # distily's modules: bitwise the saved student
    ids = token_ids(tokenizer)
    logits = assert_llama_cpp_kernels(student, path, ids)
    assert_ternary_quality(torch_logits(student, ids), logits, ids)


def test_f32_gguf_is_exactly_the_student_without_activation_quantisation(student_dir, tmp_path, tokenizer, monkeypatch):
    """Tensor names, sub-norms, RoPE layout and scales are right: with activation quantisation switched off in
    PyTorch (llama.cpp's f32 kernels do not quantise activations) the logits agree to float32 rounding."""
    import distily.bitnet.layers

    path = tmp_path / "student-f32.gguf"
    export(student_dir, ["gguf"], "f32", path)
    assert gguf_types(path)["blk.0.attn_q.weight"] == "F32"
    student = load_bitnet_student(student_dir)
    ids = token_ids(tokenizer)
    quantised = torch_logits(student, ids)
    monkeypatch.setattr(distily.bitnet.layers, "fake_quantize_activations", lambda x, strength=1.0: x)
    reference = torch_logits(student, ids)
    logits = llama_cpp_logits(path, ids)
    assert np.abs(logits - reference).max() < F32_NO_ACT_QUANT_MAX_ABS
    assert np.abs(quantised - reference).max() > 10 * F32_NO_ACT_QUANT_MAX_ABS  # the switch really changed it


def test_sizes_in_the_manifest_card_and_log(tmp_path, tokenizer, caplog):
    student = bitnet_student(ALL_TERNARY, steps=0)
    run = tmp_path / "run"
    student.save_pretrained(run)
    tokenizer.save_pretrained(run)
    with caplog.at_level("INFO", logger="distily.export.gguf"):
        export(run, ["gguf"], "tq2_0", tmp_path / "tq2_0")
    f16 = export(run, ["gguf"], "f16", tmp_path / "f16", model_card=False)
    tq1 = export(run, ["gguf"], "tq1_0", tmp_path / "tq1_0.gguf")

    manifest = json.loads((tmp_path / "tq2_0" / EXPORT_MANIFEST).read_text())
    sizes = manifest["gguf"]
    gguf_file = tmp_path / "tq2_0" / manifest["files"]["gguf"][0]
    f16_file = f16.files["gguf"][0]
    assert sizes["bytes"] == gguf_file.stat().st_size == manifest["sizes_bytes"]["gguf"]
    assert sizes["f16_gguf_bytes"] == f16_file.stat().st_size  # the f16 size is exact, not an estimate
    assert sizes["fp16_student_bytes"] == fp16_bytes(student)
    assert sizes["tensor_types"] == {"F16": 1, "F32": 2 * 2 + 1 + 2 * 2 + 2 * 7, "TQ2_0": 2 * 7}
    # Every projection at 2.06 bits per weight; the f16 token embedding (384 × 256) dominates what is left.
    assert tq1.gguf_sizes["bytes"] < sizes["bytes"] < 0.25 * sizes["f16_gguf_bytes"]
    assert f16.gguf_sizes["ratio_vs_f16_gguf"] == 1.0

    card = (tmp_path / "tq2_0" / "README.md").read_text()
    assert f"is {sizes['bytes']:,} bytes on disk" in card and f"({sizes['f16_gguf_bytes']:,} bytes)" in card
    assert "14 TQ2_0" in card and "llama.cpp architecture `bitnet`" in card
    logged = caplog.text
    assert f"{sizes['bytes']:,} bytes on disk vs {sizes['f16_gguf_bytes']:,} for an f16 GGUF" in logged
    assert "'TQ2_0': 14" in logged


def test_fallback_tensors_are_listed_and_f16_below_32_columns(caplog):
    tq2 = GGUF_OUTTYPES["tq2_0"]
    assert tq2.tensor_type("blk.0.ffn_down.weight", (256, 512), ternary=True).name == "TQ2_0"
    assert tq2.tensor_type("blk.0.attn_q.weight", (320, 320), ternary=True).name == "Q8_0"
    assert tq2.tensor_type("blk.0.attn_q.weight", (48, 48), ternary=True).name == "F16"  # not a multiple of 32
    assert tq2.tensor_type("token_embd.weight", (384, 256)).name == "F16"  # not ternary
    assert tq2.tensor_type("blk.0.attn_q.scale", (1,), ternary=False).name == "F32"
    assert GGUF_OUTTYPES["f16"].tensor_type("blk.0.attn_q.weight", (256, 256), ternary=True).name == "F16"


def test_packed_folder_exports_the_same_ternary_tensors(tmp_path, tokenizer):
    """`RUN/packed` (2-bit codes + weight_scale, loaded by transformers) gives the GGUF the run folder gives."""
    import gguf

    student = bitnet_student(ALL_TERNARY, steps=2)
    run = tmp_path / "run"
    student.save_pretrained(run)
    tokenizer.save_pretrained(run)
    save_packed(student, run / "packed", tokenizer=tokenizer)
    from_run = export(run, ["gguf"], "tq2_0", tmp_path / "run.gguf").files["gguf"][0]
    from_packed = export(run / "packed", ["gguf"], "tq2_0", tmp_path / "packed.gguf").files["gguf"][0]
    run_tensors = {t.name: t for t in gguf.GGUFReader(from_run).tensors}
    packed_tensors = {t.name: t for t in gguf.GGUFReader(from_packed).tensors}
    assert run_tensors.keys() == packed_tensors.keys()
    for name, tensor in run_tensors.items():
        assert tensor.tensor_type == packed_tensors[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(tensor.data), np.asarray(packed_tensors[name].data), err_msg=name)


def test_f16_gguf_of_a_bitnet_student_stores_codes_and_scales(student_dir, tmp_path, tokenizer):
    """Non-TQ outtypes (f32, f16, bf16, q8_0) work for BitNet students too: the codes in that type (exact in
    f16), γ as an f32 `.scale`."""
    import gguf

    path = tmp_path / "f16.gguf"
    export(student_dir, ["gguf"], "f16", path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    codes = np.asarray(tensors["blk.0.ffn_down.weight"].data, dtype=np.float32)
    assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0}
    student = load_bitnet_student(student_dir)
    _, gamma = student.model.layers[0].mlp.down_proj.ternary()
    assert float(np.asarray(tensors["blk.0.ffn_down.scale"].data)[0]) == float(gamma)
    ids = token_ids(tokenizer)
    logits = assert_llama_cpp_kernels(student, path, ids)  # F16 kernels: activations in float16, not int8
    assert_ternary_quality(torch_logits(student, ids), logits, ids)


def test_a_registered_tq_outtype_with_q8_0_embeddings_runs(student_dir, tmp_path, tokenizer):
    """The outtype registry is the seam for other policies: TQ2_0 projections with a Q8_0 token embedding
    (smaller than the f16 one the built-in tq2_0 keeps, at the cost of rounding the tied LM head)."""
    import gguf

    from distily.export.gguf import OutType, register_gguf_outtype

    quant = gguf.GGMLQuantizationType
    name = "tq2_0_q8_0_embeddings"
    entry = OutType(
        name, gguf.LlamaFileType.MOSTLY_TQ2_0, quant.Q8_0, fallback_type=quant.Q8_0, ternary_type=quant.TQ2_0
    )
    register_gguf_outtype(name)(entry)
    try:
        path = tmp_path / "q8emb.gguf"
        report = write_gguf(load_bitnet_student(student_dir), tokenizer, path, name)
    finally:
        GGUF_OUTTYPES.unregister(name)
    assert report.tensor_types["token_embd.weight"] == "Q8_0"
    assert report.size_bytes < export(student_dir, ["gguf"], "tq2_0", tmp_path / "tq2.gguf").gguf_sizes["bytes"]
    ids = token_ids(tokenizer)
    student = load_bitnet_student(student_dir)
    logits = assert_llama_cpp_kernels(student, path, ids)  # the Q8_0 embedding rows and LM-head activations
    assert_ternary_quality(torch_logits(student, ids), logits, ids)


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def test_tq_outtypes_refuse_full_precision_students(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB))
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ExportError, match=r"--outtype tq2_0 stores ternary weights .* distil a BitNet student"):
        export(folder, ["gguf"], "tq2_0", tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="--outtype tq1_0 stores ternary weights"):
        check_exportable(model, tokenizer, ["gguf"], outtype="tq1_0")  # what training checks before step 0
    out = tmp_path / "cli.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--outtype", "tq2_0", "--output", str(out)]) == 2
    assert "stores ternary weights" in capsys.readouterr().err and not out.exists()


def test_untied_bitnet_student_is_refused(tokenizer):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB, tie_word_embeddings=False))
    student = build_student(teacher, {"num_hidden_layers": 2, "bitnet": True})
    with pytest.raises(ExportError, match="untied LM head"):
        check_exportable(student, tokenizer, ["gguf"], outtype="tq2_0")


# ----------------------------------------------------------------------------------------------------------------
# The command line: `distily export --outtype tq2_0` and `--export gguf --export_outtype tq2_0` after training


def test_training_a_bitnet_student_with_tq2_0_export(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB, tie_word_embeddings=True, **ALL_TERNARY))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(30):
        (corpus / f"m{index:02d}.py").write_text(f"def f{index}(x):\n    return x * {index}\n\n" + TEXT)
    out = tmp_path / "run"
    args = [
        "--teacher", str(tmp_path / "teacher"), "--student_config", '{"num_hidden_layers": 2, "bitnet": true}',
        "--dataset", str(corpus), "--dataset_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
        "--seq_len", "32", "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--export", "gguf", "--export_outtype", "tq2_0",
    ]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / "export" / EXPORT_MANIFEST).read_text())
    assert manifest["outtypes"] == {"gguf": "tq2_0"} and manifest["gguf"]["tensor_types"]["TQ2_0"] == 14
    path = out / "export" / manifest["files"]["gguf"][0]
    ids = token_ids(tokenizer)
    student = load_bitnet_student(out)
    logits = assert_llama_cpp_kernels(student, path, ids)
    assert_ternary_quality(torch_logits(student, ids), logits, ids)
    capsys.readouterr()

    # The same through `distily export` on the finished run, into a single file.
    single = tmp_path / "student-tq1_0.gguf"
    assert main(["export", str(out), "--format", "gguf", "--outtype", "tq1_0", "--output", str(single)]) == 0
    assert gguf_types(single)["blk.1.ffn_down.weight"] == "TQ1_0"
    assert_llama_cpp_kernels(student, single, ids)
