"""Exports of tiny Llama and GPT-2 students: safetensors and GGUF (run in llama.cpp), cards, atomicity."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from distily.cli import main
from distily.export import EXPORT_MANIFEST, ExportError, export
from distily.export.gguf import GGUF_OUTTYPES, detect_pre_tokenizer, write_gguf
from distily.export.model_card import parse_front_matter

from .conftest import (
    BYTE_SAMPLE_TEXT,
    BYTE_VOCAB,
    SAMPLE_TEXT,
    make_byte_bpe_tokenizer,
    tiny_gpt2_config,
    tiny_llama_config,
)

TEXT = BYTE_SAMPLE_TEXT + SAMPLE_TEXT
# Max |logit difference| allowed against PyTorch float32, per GGUF outtype (logits have std ≈ 2-3 here).
# llama.cpp's GELU uses a float16 lookup table even for f32 weights, hence 5e-3 rather than ~1e-5 for f32.
LOGIT_ATOL = {"f32": 5e-3, "f16": 3e-2}


def trained(model: torch.nn.Module, tokenizer, steps: int = 20) -> torch.nn.Module:
    """The model after memorising TEXT: confident predictions, like a trained student (random init is flat)."""
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"][:96]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_bpe_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def student_dir(request, tokenizer, tmp_path_factory):
    """A trained tiny student saved as a model folder (what `distily export` reads), per architecture."""
    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB))
    else:
        # transformers reads a GGUF GPT-2's context length into n_ctx, not n_positions (which stays 1024), so
        # the round trip through transformers needs the default 1024 positions.
        model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=BYTE_VOCAB, n_positions=1024))
    trained(model, tokenizer)
    folder = tmp_path_factory.mktemp(f"student-{request.param}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_ids(tokenizer) -> list[int]:
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"][:96]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """Logits of every position from llama.cpp (float32 KV cache, so f32 weights compare tightly)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def assert_same_top1(reference: np.ndarray, other: np.ndarray, atol: float) -> None:
    """At every position the other runtime's top token is the reference's, or a near-tie within ``atol``."""
    ref_top = reference.argmax(-1)
    other_top = other.argmax(-1)
    rows = np.arange(len(reference))
    gap = reference[rows, ref_top] - reference[rows, other_top]
    assert np.all((ref_top == other_top) | (gap <= atol)), np.nonzero(gap > atol)
    assert (ref_top == other_top).mean() >= 0.98


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    log_probs = torch.tensor(logits[:-1]).log_softmax(-1)
    return math.exp(-log_probs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item())


# ----------------------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_export_loads_and_matches_exactly(student_dir, tmp_path, tokenizer):
    out = tmp_path / "export"
    result = export(student_dir, ["safetensors"], output=out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / EXPORT_MANIFEST).read_text())["status"] == "complete"
    assert result.outtypes == {"safetensors": "f32"}
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # plain transformers classes only
    ids = token_ids(tokenizer)
    assert AutoTokenizer.from_pretrained(out)(TEXT, add_special_tokens=False)["input_ids"][:96] == ids
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(student_dir), ids)
    np.testing.assert_array_equal(torch_logits(AutoModelForCausalLM.from_pretrained(out), ids), expected)
    # A plain model folder (no run record) still gets a card, and it says what it does not know.
    card = (out / "README.md").read_text()
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "openrail" and "model-index" not in meta
    layers = AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers
    assert f"| layers | n/a | {layers} |" in card and "no distily run record" in card


def test_safetensors_f16_export_is_half_precision_and_close(student_dir, tmp_path, tokenizer):
    out = tmp_path / "export"
    export(student_dir, ["safetensors"], "f16", out, model_card=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float16
    reference = AutoModelForCausalLM.from_pretrained(student_dir)
    ids = token_ids(tokenizer)
    np.testing.assert_allclose(
        torch_logits(model.float(), ids), torch_logits(reference, ids), atol=LOGIT_ATOL["f16"], rtol=0
    )


# ----------------------------------------------------------------------------------------------------------------
# GGUF, run in llama.cpp and read back by transformers


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_runs_in_llama_cpp_and_matches_pytorch(student_dir, tmp_path, tokenizer, outtype):
    path = tmp_path / f"student-{outtype}.gguf"
    result = export(student_dir, ["gguf"], outtype, path)
    assert result.files["gguf"] == [path] and path.is_file()
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    ids = token_ids(tokenizer)
    reference = torch_logits(model, ids)
    logits = llama_cpp_logits(path, ids)
    assert logits.shape == reference.shape
    if outtype in LOGIT_ATOL:
        assert np.abs(logits - reference).max() < LOGIT_ATOL[outtype]
        assert_same_top1(reference, logits, LOGIT_ATOL[outtype])
    else:  # q8_0: weights rounded to 8 bits per block of 32; the model's perplexity moves by under 1%
        assert perplexity(logits, ids) == pytest.approx(perplexity(reference, ids), rel=0.01)
        assert np.abs(logits - reference).max() > 1e-4  # it really is quantised

    # Round trip: transformers reads the GGUF back (dequantising) and matches PyTorch too.
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    back_logits = torch_logits(back, ids)
    if outtype == "f32":
        np.testing.assert_array_equal(back_logits, reference)
    elif outtype == "f16":
        assert np.abs(back_logits - reference).max() < LOGIT_ATOL["f16"]
    else:
        assert perplexity(back_logits, ids) == pytest.approx(perplexity(reference, ids), rel=0.01)


def test_gguf_tokenizer_matches_in_llama_cpp(student_dir, tmp_path, tokenizer):
    """llama.cpp tokenises text exactly like the HF tokenizer (bytes, digits, unicode, code, whitespace)."""
    import llama_cpp

    path = tmp_path / "student.gguf"
    export(student_dir, ["gguf"], "f16", path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "  x  =  1\n\n\n", "éà 🦙🦙 3333 it's", "<s>plain text</s>"):
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            # special=True: like the HF tokenizer, llama.cpp parses "<s>" in the text as the control token.
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
            assert llm.detokenize(expected, special=True).decode() == tokenizer.decode(expected)
        assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
    finally:
        llm.close()


def test_gguf_metadata_and_tensor_types(student_dir, tmp_path, tokenizer):
    import gguf

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    report = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0", name="tiny")
    reader = gguf.GGUFReader(report.path)
    fields = {key: reader.fields[key].contents() for key in reader.fields if not key.startswith("GGUF.")}
    arch = model.config.model_type
    assert fields["general.architecture"] == arch and fields["general.name"] == "tiny"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(BYTE_VOCAB)]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # <pad> <s> </s> are control tokens
    assert len(fields["tokenizer.ggml.merges"]) == BYTE_VOCAB - 3 - 256
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields[f"{arch}.block_count"] == 4 and fields[f"{arch}.embedding_length"] == 32
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types if arch == "gpt2" else types["output.weight"] == "Q8_0"


def test_llama_q_and_k_rows_are_permuted_for_llama_cpp_rope():
    from distily.export.gguf import LlamaArchitecture

    # One head of dim 4: rows [q0, q1 | q2, q3] (transformers' halves) become [q0, q2, q1, q3] (pairs).
    weight = torch.arange(8.0).reshape(4, 2)
    permuted = LlamaArchitecture.permute(weight, heads=1)
    assert permuted[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    two_heads = torch.arange(8.0).reshape(8, 1)
    assert LlamaArchitecture.permute(two_heads, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ----------------------------------------------------------------------------------------------------------------
# Pre-tokenizer detection


LLAMA3_LIKE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_pre_tokenizer_detection_names_llama_cpp_regexes(tokenizer):
    from tokenizers import pre_tokenizers

    assert detect_pre_tokenizer(tokenizer) == "gpt-2"
    assert detect_pre_tokenizer(make_byte_bpe_tokenizer(split_regex=LLAMA3_LIKE)) == "llama-bpe"
    digits = make_byte_bpe_tokenizer()
    digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    digits.clean_up_tokenization_spaces = False
    assert detect_pre_tokenizer(digits) == "smollm"
    odd = make_byte_bpe_tokenizer(split_regex=r"\w+|\s+")
    with pytest.raises(ExportError, match="--gguf_tokenizer_pre"):
        detect_pre_tokenizer(odd)


def test_llama3_style_tokenizer_tokenises_the_same_in_llama_cpp(tmp_path):
    import llama_cpp

    tok = make_byte_bpe_tokenizer(split_regex=LLAMA3_LIKE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB)).eval()
    report = write_gguf(model, tok, tmp_path / "l3.gguf", "f16")
    assert report.tokenizer_pre == "llama-bpe"
    llm = llama_cpp.Llama(model_path=str(report.path), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "12345 67 it'S  \n\n x"):
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=False)
                == tok(text, add_special_tokens=False)["input_ids"]
            )
    finally:
        llm.close()


# ----------------------------------------------------------------------------------------------------------------
# Refusals and atomicity


def test_export_into_an_existing_path_fails_without_overwrite(student_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(student_dir), "--format", "safetensors", "--output", str(out)]) == 0
    weights = (out / "model.safetensors").read_bytes()
    assert main(["export", str(student_dir), "--format", "safetensors", "--output", str(out)]) == 2
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"precious")
    assert main(["export", str(student_dir), "--format", "gguf", "--output", str(gguf_file)]) == 2
    assert gguf_file.read_bytes() == b"precious"
    # --overwrite replaces a distily export, never a folder distily did not write.
    assert main(["export", str(student_dir), "--format", "gguf", "--output", str(out), "--overwrite", "true"]) == 0
    assert not (out / "model.safetensors").exists() and list(out.glob("*.gguf"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["export", str(student_dir), "--output", str(other), "--overwrite", "true"]) == 2
    assert "never replaced" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep"


def test_bad_export_requests_fail_before_writing(student_dir, tmp_path, capsys):
    out = tmp_path / "export"
    cases = [
        (["--format", "onnx"], "not a known format"),
        (["--format", "safetensors", "--outtype", "q8_0"], "not available for safetensors"),
        (["--format", "gguf", "--outtype", "q4_k"], "not available for gguf"),
        (["--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    ]
    for extra, message in cases:
        assert main(["export", str(student_dir), "--output", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_export_leaves_nothing_that_looks_complete(student_dir, tmp_path, monkeypatch):
    import distily.export.safetensors as safetensors_module

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_module, "write_safetensors", explode)
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        export(student_dir, ["gguf", "safetensors"], output=out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is gone too


def test_unsupported_architecture_is_refused_with_the_alternative(tmp_path, tokenizer):
    from transformers import GPT2Config

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=BYTE_VOCAB, n_embd=32, n_layer=1, n_head=4, activation_function="relu")
    )
    with pytest.raises(ExportError, match=r"activation_function='relu'.*safetensors"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert {"f32", "f16", "bf16", "q8_0"} <= set(GGUF_OUTTYPES)


# ----------------------------------------------------------------------------------------------------------------
# A whole run with --export: card, loss curve, both formats


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tokenizer):
    """`distily train ... --export safetensors,gguf` on a tiny Llama teacher with a byte-level tokenizer."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=BYTE_VOCAB))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(30):
        (corpus / f"m{index:02d}.py").write_text(f"def f{index}(x):\n    return x * {index}\n\n" + TEXT)
    out = root / "out"
    args = [
        "--teacher", str(root / "teacher"), "--student_config", '{"num_hidden_layers": 2}',
        "--dataset", str(corpus), "--dataset_cache_dir", str(root / "cache"), "--output_dir", str(out),
        "--seq_len", "32", "--max_steps", "4", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--export", "safetensors,gguf", "--export_outtype", "f16",
    ]  # fmt: skip
    assert main(args) == 0
    return out


def test_training_with_export_writes_a_hub_ready_folder(exported_run):
    export_dir = exported_run / "export"
    manifest = json.loads((export_dir / EXPORT_MANIFEST).read_text())
    assert manifest["formats"] == ["safetensors", "gguf"] and manifest["outtypes"] == {
        "safetensors": "f16",
        "gguf": "f16",
    }
    assert (export_dir / "model.safetensors").is_file() and (export_dir / "out-f16.gguf").is_file()
    assert (export_dir / "distily_config.yaml").is_file()
    png = (export_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # A fresh process that never imports distily loads the export and gets the run's own logits.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert 'distily' not in sys.modules\n"
        "ids = t('def f(x):\\n    return x', return_tensors='pt')['input_ids']\n"
        "torch.save({'ids': ids, 'logits': m(ids).logits.detach()}, sys.argv[2])\n"
    )
    saved = export_dir.parent / "fresh.pt"
    subprocess.run([sys.executable, "-c", script, str(export_dir), str(saved)], check=True, timeout=300)
    fresh = torch.load(saved)
    run_model = AutoModelForCausalLM.from_pretrained(exported_run)  # the trained float32 student
    assert run_model.config.num_hidden_layers == 2
    with torch.no_grad():
        expected = run_model(fresh["ids"]).logits
    torch.testing.assert_close(fresh["logits"].float(), expected, atol=LOGIT_ATOL["f16"], rtol=0)  # exported as f16


def test_model_card_front_matter_and_contents(exported_run):
    card = (exported_run / "export" / "README.md").read_text()
    meta = parse_front_matter(card)
    assert set(meta) >= {"license", "library_name", "pipeline_tag", "tags", "model-index"}
    assert meta["license"] == "openrail" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"distily", "gguf"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local teacher folder is no Hub id
    assert "datasets" not in meta  # nor is a local corpus
    after = json.loads((exported_run / "eval_results.json").read_text())
    before = json.loads((exported_run / "eval_start_results.json").read_text())
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0] == {
        "type": "perplexity",
        "value": round(after["eval_student_ppl"], 4),
        "name": "Perplexity",
    }
    assert "pip install distily==0.1.0" in card
    command = json.loads((exported_run / "distily_run.json").read_text())["command"]
    assert command and command in card
    assert f"{before['eval_student_ppl']:,.2f}" in card and f"{after['eval_student_ppl']:,.2f}" in card
    assert f"{before['eval_teacher_ppl']:,.2f}" in card
    assert "| `num_hidden_layers` | 4 | 2 |" in card  # architecture difference
    assert "![Training loss](loss_curve.png)" in card
    assert "CPU" in card and "Made with distily 0.1.0" in card


def test_card_for_a_python_run_reconstructs_the_command(exported_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    manifest = json.loads((run / "distily_run.json").read_text())
    manifest["command"] = None
    (run / "distily_run.json").write_text(json.dumps(manifest))
    export(run, ["safetensors"], output=tmp_path / "exp")
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "distily --config distily_config.yaml" in card and "started from Python" in card


def test_card_reads_back_with_huggingface_hub_and_its_eval_results(exported_run, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    card = ModelCard.load(exported_run / "export" / "README.md")
    after = json.loads((exported_run / "eval_results.json").read_text())
    config = yaml.safe_load((exported_run / "export" / "distily_config.yaml").read_text())
    assert card.data.license == "openrail" and card.data.library_name == "transformers"
    assert card.data.model_name == "out" and card.data.pipeline_tag == "text-generation"
    (result,) = card.data.eval_results
    assert (result.task_type, result.task_name) == ("text-generation", "Text Generation")
    assert (result.dataset_type, result.dataset_name) == (
        config["dataset"],
        f"{config['dataset']} (held-out eval split)",
    )
    assert (result.metric_type, result.metric_name) == ("perplexity", "Perplexity")
    assert result.metric_value == round(after["eval_student_ppl"], 4)

    # With `distily eval` scores: one EvalResult per (task, metric); two metrics of one task share its entry.
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    evaluation = {
        "student": {"tasks": {"hellaswag": {"acc": 0.25, "acc_norm": 0.3}, "piqa": {"acc": 0.6}}},
        "teacher": {"tasks": {"hellaswag": {"acc": 0.4, "acc_norm": 0.5}, "piqa": {"acc": 0.7}}},
    }
    (run / "distily_eval.json").write_text(json.dumps(evaluation))
    export(run, ["safetensors"], output=tmp_path / "exp")
    card = ModelCard.load(tmp_path / "exp" / "README.md")
    scores = [(r.dataset_type, r.metric_type, r.metric_value, r.source_url) for r in card.data.eval_results]
    harness = "https://github.com/EleutherAI/lm-evaluation-harness"
    assert scores == [
        (config["dataset"], "perplexity", round(after["eval_student_ppl"], 4), None),
        ("hellaswag", "acc", 0.25, harness),
        ("hellaswag", "acc_norm", 0.3, harness),
        ("piqa", "acc", 0.6, harness),
    ]
    results = parse_front_matter((tmp_path / "exp" / "README.md").read_text())["model-index"][0]["results"]
    assert [[m["type"] for m in r["metrics"]] for r in results] == [["perplexity"], ["acc", "acc_norm"], ["acc"]]


def test_gguf_perplexity_in_llama_cpp_on_the_runs_eval_split(exported_run, tmp_path, capsys):
    """The export measures its GGUF file in llama.cpp on the run's eval blocks; `distily eval FILE.gguf` does the
    same for any GGUF of the run. Both land in the run's distily_eval.json beside the PyTorch perplexity."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    after = json.loads((exported_run / "eval_results.json").read_text())
    entry = json.loads((exported_run / "distily_eval.json").read_text())["gguf"]["out-f16.gguf"]
    assert entry["file"] == str((exported_run / "export" / "out-f16.gguf").resolve())  # the final path, not tmp
    assert entry["pytorch_ppl"] == after["eval_student_ppl"] and entry["eval_tokens"] == after["eval_tokens"]
    # f16 weights and llama.cpp's f16 KV cache: the same model up to half-precision rounding of the logits
    assert entry["eval_ppl"] == pytest.approx(after["eval_student_ppl"], rel=1e-2)
    card = (exported_run / "export" / "README.md").read_text()
    assert "`out-f16.gguf` in llama.cpp" in card and f"{entry['eval_ppl']:,.4f}" in card

    # an f32 file elsewhere, measured through the CLI with --run_dir: the exact mapping, so far closer
    f32 = tmp_path / "elsewhere" / "student-f32.gguf"
    assert main(["export", str(exported_run), "--format", "gguf", "--outtype", "f32", "--output", str(f32)]) == 0
    out = tmp_path / "eval.json"
    argv = ["eval", str(f32), "--tasks", "perplexity", "--run_dir", str(exported_run), "--output", str(out)]
    assert main(argv) == 0
    measured = json.loads(out.read_text())["gguf"]["student-f32.gguf"]
    assert measured["eval_ppl"] == pytest.approx(after["eval_student_ppl"], rel=1e-3)
    assert (
        abs(measured["eval_ppl"] / after["eval_student_ppl"] - 1)
        < abs(entry["eval_ppl"] / after["eval_student_ppl"] - 1) + 1e-4
    )
    assert "in llama.cpp" in capsys.readouterr().out
    # a GGUF file outside any run, without --run_dir: there is no eval split to measure it on
    assert main(["eval", str(f32), "--tasks", "perplexity"]) == 2
    assert "--run_dir" in capsys.readouterr().err
    assert main(["eval", str(f32), "--tasks", "hellaswag", "--run_dir", str(exported_run)]) == 2
    assert "--tasks perplexity" in capsys.readouterr().err
    assert sorted(p.name for p in f32.parent.iterdir()) == ["student-f32.gguf"]  # nothing written beside it


def test_gguf_export_writes_the_pre_tokenizer_the_run_recorded(exported_run, tmp_path, monkeypatch):
    """The run records its GGUF teacher's pre-tokenizer name; the export reads it from the run folder and never
    looks the teacher up (here it could not: resolving any teacher fails)."""
    import shutil

    import gguf

    import distily.teacher.loading

    assert json.loads((exported_run / "distily_run.json").read_text())["teacher_gguf_tokenizer_pre"] is None
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    manifest = json.loads((run / "distily_run.json").read_text())
    manifest["teacher_gguf_tokenizer_pre"] = "qwen2"
    (run / "distily_run.json").write_text(json.dumps(manifest))

    def no_teacher(name):
        raise AssertionError(f"the export looked up the teacher {name!r}")

    monkeypatch.setattr(distily.teacher.loading, "resolve_teacher_path", no_teacher)
    result = export(run, ["gguf"], output=tmp_path / "recorded", model_card=False)
    (path,) = result.files["gguf"]
    assert result.gguf_tokenizer_pre == "qwen2"
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert json.loads((tmp_path / "recorded" / EXPORT_MANIFEST).read_text())["gguf_tokenizer_pre"] == "qwen2"
    given = export(run, ["gguf"], output=tmp_path / "given.gguf", gguf_tokenizer_pre="llama-bpe")
    assert given.gguf_tokenizer_pre == "llama-bpe"  # --gguf_tokenizer_pre wins over the record


def test_a_run_recorded_before_the_pre_tokenizer_was_kept_exports_its_teachers(exported_run, tmp_path, tokenizer):
    """An older run folder has no ``teacher_gguf_tokenizer_pre``: `distily export` looks its GGUF teacher up."""
    import shutil

    import gguf

    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    teacher = tmp_path / "teacher.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(run), tokenizer, teacher, "f32", tokenizer_pre="qwen2")
    manifest = json.loads((run / "distily_run.json").read_text())
    del manifest["teacher_gguf_tokenizer_pre"]
    manifest["teacher"] = str(teacher)
    (run / "distily_run.json").write_text(json.dumps(manifest))
    assert main(["export", str(run), "--format", "gguf", "--output", str(tmp_path / "old.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "old.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"


def test_the_pre_tokenizer_a_run_records_is_read_from_its_gguf_teacher(student_dir, tmp_path, tokenizer):
    from distily.run import teacher_gguf_tokenizer_pre

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = tmp_path / "teacher.gguf"
    write_gguf(model, tokenizer, teacher, "f32", tokenizer_pre="qwen2")
    vocab = model.config.vocab_size
    assert teacher_gguf_tokenizer_pre(str(teacher), vocab) == "qwen2"
    assert teacher_gguf_tokenizer_pre(str(teacher), vocab + 1) is None  # another vocabulary: not the student's
    assert teacher_gguf_tokenizer_pre(str(student_dir), vocab) is None  # not a GGUF teacher
    assert teacher_gguf_tokenizer_pre(str(tmp_path / "missing.gguf"), vocab) is None
    assert teacher_gguf_tokenizer_pre(None) is None


def test_push_to_hub_commits_the_export_folder_privately(exported_run, monkeypatch):
    import huggingface_hub.hf_api
    from huggingface_hub import HfApi

    from distily.export.hub import push_to_hub

    calls = {}

    class RecordingApi(HfApi):
        """The real HfApi (its upload_folder picks the files and builds the commit) with the network calls
        replaced: creating the repo, the Hub's README check and the commit itself are recorded instead."""

        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = (repo_id, kwargs)

        def _validate_yaml(self, content, **kwargs):
            calls["validated"] = content

        def create_commit(self, repo_id, operations, **kwargs):
            calls["commit"] = (repo_id, operations, kwargs)
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    # upload_folder's one-commit path (its Xet path streams files to the Hub itself).
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    hidden = exported_run / "export" / ".notes"
    hidden.write_text("a hidden file stays on the machine")
    try:
        url = push_to_hub(exported_run / "export", "me/tiny-student", api=RecordingApi(endpoint="https://hub.invalid"))
    finally:
        hidden.unlink()
    assert calls["validated"].startswith("---\n")
    assert url == "https://hub.example/me/tiny-student/commit/1"
    assert calls["repo"] == ("me/tiny-student", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, operations, kwargs = calls["commit"]
    assert repo_id == "me/tiny-student" and kwargs["repo_type"] == "model" and kwargs["commit_message"]
    names = [op.path_in_repo for op in operations]
    assert names == sorted(p.name for p in (exported_run / "export").iterdir())
    assert {"README.md", "model.safetensors", "out-f16.gguf", "loss_curve.png"} <= set(names)
    readme = next(op for op in operations if op.path_in_repo == "README.md")
    with open(readme.path_or_fileobj) as handle:
        assert handle.read().startswith("---\n")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--export", "onnx"], r"--export \['onnx'\] is not a known format"),
        (["--export", "safetensors", "--export_outtype", "q8_0"], "'q8_0' is not available for safetensors"),
        (["--export", "gguf"], "GGUF export supports byte-level BPE tokenizers"),  # the char-level test tokenizer
        (["--export_push_to_hub", "true"], "--export_push_to_hub needs something to push"),
    ],
)
def test_training_export_problems_fail_before_training(extra, message, tiny_teacher_dir, text_corpus, tmp_path, capsys):
    import re

    from .test_cli import base_args

    out = tmp_path / "run"
    assert main([*base_args(tiny_teacher_dir, text_corpus, out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
