"""Several teachers at once: weights, the log-sum-exp mixture, routing by a data column, the hidden-state teacher,
and the bad-input errors (before anything is written)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from distily import ConfigError, DistillationTrainer, TeacherEnsemble, TeacherMember
from distily.config import DataArguments, StudentArguments, TeacherArguments
from distily.data import prepare_datasets
from distily.errors import DataError
from distily.losses import forward_kl, reverse_kl
from distily.mixture import merge_sparse
from distily.run import train
from distily.sparse import SparseTeacher, sparse_token_divergence
from distily.teacher.cache import TeacherCache
from distily.teacher.cache.reader import RecordedSignal
from distily.teacher.ensemble import SparseMixtureSignal

from .conftest import make_tiny_tokenizer, tiny_llama_config
from .test_record import bucket_cache_dir, dataset_batch, teacher_dir  # noqa: F401 (fixtures)
from .test_record import make_config as record_config
from .test_trainer import make_config, random_blocks

T = 2.0


def tiny(seed: int, scale: float = 1.0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # distinct, peaked teachers
    return model


def batch_of(trainer, rows=4, route=None):
    features = [{"input_ids": row} for row in random_blocks(rows)["input_ids"]]
    if route is not None:
        for feature, teacher in zip(features, route, strict=True):
            feature["teacher_ids"] = [teacher] * len(feature["input_ids"])
    return trainer.data_collator(features)


def loss_and_grads(trainer, batch, training=True):
    model = trainer.model
    model.zero_grad()
    model.train(training)
    with torch.set_grad_enabled(training):
        value = trainer.compute_loss(model, batch)
    if training:
        value.backward()
        return value.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return value.detach(), None


def trainer_for(tmp_path, student, teacher, **overrides):
    values = dict(temperature=T, loss="forward_kl", alpha=1.0)
    values.update(overrides)
    return DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=make_config(tmp_path, **values)
    )


def test_weights_are_normalised():
    ensemble = TeacherEnsemble([TeacherMember(tiny(0), "a", 1.0), TeacherMember(tiny(1), "b", 3.0)])
    assert ensemble.weights == pytest.approx([0.25, 0.75], abs=1e-15)
    assert ensemble.feature_teacher == "a"
    same = TeacherEnsemble(
        [TeacherMember(None, "a", 2.0, cache=object()), TeacherMember(None, "b", 6.0, cache=object())]
    )
    assert same.weights == pytest.approx(ensemble.weights, abs=1e-15)


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_the_target_is_the_weighted_mixture_of_the_teachers(tmp_path, chunked):
    """KD = T² · mean KL(0.25 p_a + 0.75 p_b ‖ q), against the teachers' own forward passes."""
    a, b, student = tiny(0, 8.0), tiny(1, 8.0), tiny(2)
    ensemble = TeacherEnsemble([TeacherMember(a, "a", 1.0), TeacherMember(b, "b", 3.0)])
    trainer = trainer_for(tmp_path, student, ensemble, chunked_loss=chunked, loss_chunk_size=16)
    batch = batch_of(trainer)
    value, _ = loss_and_grads(trainer, batch)
    with torch.no_grad():
        ids = batch["input_ids"]
        p = 0.25 * (a(ids).logits[:, :-1] / T).softmax(-1) + 0.75 * (b(ids).logits[:, :-1] / T).softmax(-1)
        log_q = (student(ids).logits[:, :-1] / T).log_softmax(-1)
    expected = T**2 * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # And it is neither teacher alone.
    alone = trainer_for(tmp_path, student, a, chunked_loss=chunked)
    assert abs(loss_and_grads(alone, batch)[0] - value) > 1e-2


@pytest.mark.parametrize("chunked", ["true", "false"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_a_mixture_of_one_teacher_equals_that_teacher_live(tmp_path, chunked, loss):
    teacher, student = tiny(0, 8.0), tiny(2)
    common = dict(chunked_loss=chunked, loss=loss, alpha=0.7, loss_chunk_size=16)
    single = trainer_for(tmp_path, student, teacher, **common)
    mixture = trainer_for(tmp_path, student, TeacherEnsemble([TeacherMember(teacher, "only", 5.0)]), **common)
    batch = batch_of(single)
    reference, reference_grads = loss_and_grads(single, batch)
    value, grads = loss_and_grads(mixture, batch)
    # log_softmax of log-probabilities: the same distribution up to float32 rounding.
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, reference_grads, rtol=1e-4, atol=1e-6)
    data = random_blocks(8)
    single_eval = trainer_for(tmp_path, student, teacher, **common).evaluate(data)
    mixture_eval = trainer_for(tmp_path, student, TeacherEnsemble([TeacherMember(teacher, "only")]), **common)
    mixture_eval = mixture_eval.evaluate(data)
    for key in ("eval_loss", "eval_student_ppl", "eval_teacher_ppl"):
        assert mixture_eval[key] == pytest.approx(single_eval[key], rel=1e-5), key


def random_sparse(rows=5, vocab=60, k=6, seed=0) -> SparseTeacher:
    generator = torch.Generator().manual_seed(seed)
    log_p = (3 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)).log_softmax(-1)
    values, ids = log_p.topk(k, -1)
    return SparseTeacher(ids, values, log_p.scatter(-1, ids, float("-inf")).logsumexp(-1))


@pytest.mark.parametrize("loss_fn", [forward_kl, reverse_kl])
def test_a_mixture_of_one_recorded_teacher_equals_that_teacher(loss_fn):
    teacher = random_sparse()
    nll = torch.rand(5, dtype=torch.float64)
    alone = RecordedSignal(teacher, nll)
    mixture = SparseMixtureSignal([alone], torch.zeros(1, dtype=torch.float64), 60)
    merged = mixture.top_k(slice(1, 4))
    student = torch.randn(3, 60, dtype=torch.float64)
    expected = sparse_token_divergence(student, alone.top_k(slice(1, 4)), loss_fn)
    torch.testing.assert_close(sparse_token_divergence(student, merged, loss_fn), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(merged.tail_logprob, teacher.tail_logprob[1:4], rtol=0, atol=0)
    torch.testing.assert_close(mixture.teacher_nll(slice(None)), nll.float())


def test_merged_recorded_teachers_are_the_dense_mixture_coarse_grained():
    """Teachers whose tails are even: the merged buckets equal the dense weighted mixture grouped into the union
    of the top-k sets, the free slots and one tail (an exact identity, independent of the merge's own code)."""
    vocab, rows, k = 50, 4, 6
    dense, sparse = [], []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(rows)])
        if seed == 1:
            ids[:, :2] = sparse[0].ids[:, :2]  # overlapping top-k sets: the union has fewer than 2k ids
        top = torch.rand(rows, k, generator=generator, dtype=torch.float64) * 0.1 + 0.02
        tail = 1 - top.sum(-1)
        full = (tail / (vocab - k))[:, None].expand(rows, vocab).clone().scatter_(1, ids, top)
        dense.append(full)
        sparse.append(SparseTeacher(ids, top.log(), tail.log()))
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    merged = merge_sparse(sparse, weights.log(), vocab)
    assert all(len(set(row.tolist())) == 2 * k for row in merged.ids)  # 2k distinct ids per token
    mixture = weights[0] * dense[0] + weights[1] * dense[1]
    torch.testing.assert_close(merged.logprobs.exp(), mixture.gather(1, merged.ids), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(merged.tail_logprob.exp(), 1 - mixture.gather(1, merged.ids).sum(-1), rtol=1e-10, atol=0)


def test_a_mixture_of_one_recorded_teacher_trains_like_the_cache(
    tmp_path,
    bucket_cache_dir,  # noqa: F811 (the fixture imported above)
    text_corpus,
    tiny_tokenizer,
):
    batch, _ = dataset_batch(bucket_cache_dir, text_corpus, tiny_tokenizer)
    student = tiny(1, num_hidden_layers=2)
    cached = DistillationTrainer(
        model=copy.deepcopy(student), args=record_config(tmp_path, teacher_cache=str(bucket_cache_dir))
    )
    member = TeacherMember(None, "recorded", cache=TeacherCache(bucket_cache_dir))
    mixture = DistillationTrainer(
        model=copy.deepcopy(student),
        teacher_model=TeacherEnsemble([member]),
        args=record_config(tmp_path, remove_unused_columns=False),
    )
    reference, reference_grads = loss_and_grads(cached, batch)
    value, grads = loss_and_grads(mixture, batch)
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, reference_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_routing_uses_the_named_teacher(tmp_path, chunked):
    """Sequences 0 and 2 name teacher b, 1 and 3 teacher a: the loss is each sequence's loss under its own teacher
    alone (every sequence has the same number of tokens, so the mean is the mean of the halves)."""
    a, b, student = tiny(0, 8.0), tiny(1, 8.0), tiny(2)
    ensemble = TeacherEnsemble([TeacherMember(a, "a"), TeacherMember(b, "b", 9.0)], routed=True)
    routed = trainer_for(tmp_path, student, ensemble, chunked_loss=chunked, loss_chunk_size=16)
    batch = batch_of(routed, route=[1, 0, 1, 0])
    value, _ = loss_and_grads(routed, batch)
    halves = []
    for teacher, rows in ((a, [1, 3]), (b, [0, 2])):
        alone = trainer_for(tmp_path, student, teacher, chunked_loss=chunked)
        part = {key: tensor[rows] for key, tensor in batch.items() if key != "teacher_ids"}
        halves.append(loss_and_grads(alone, part)[0])
    torch.testing.assert_close(value, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)
    # A batch routed entirely to a is teacher a's loss, b never runs (it does run on the mixed batch).
    calls = []
    handle = b.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    loss_and_grads(routed, batch)
    assert calls
    calls.clear()
    only_a = batch_of(routed, route=[0, 0, 0, 0])
    expected = loss_and_grads(trainer_for(tmp_path, student, a, chunked_loss=chunked), batch_of(routed))[0]
    torch.testing.assert_close(loss_and_grads(routed, only_a)[0], expected, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert calls == []


def test_hidden_state_terms_read_the_named_teacher(tmp_path):
    a, b, student = tiny(0), tiny(1), tiny(2)
    objective = {"logits": 0, "hidden_states": {"projector": "identity", "norm": "none", "layer_mapper": "all"}}
    config = dict(objective=objective)
    losses = {}
    for name, teacher in (("a", a), ("b", b)):
        losses[name] = loss_and_grads(trainer_for(tmp_path, student, teacher, **config), batch_of_plain())[0]
    ensemble = TeacherEnsemble([TeacherMember(a, "a"), TeacherMember(b, "b")], feature_teacher="b")
    value = loss_and_grads(trainer_for(tmp_path, student, ensemble, **config), batch_of_plain())[0]
    assert value == losses["b"] and value != losses["a"]
    # With the logit term too: the mixture's KD plus b's hidden-state term (the hooks capture b while the mixture
    # runs both teachers).
    both = {"logits": 1.0, "hidden_states": objective["hidden_states"]}
    combined = loss_and_grads(trainer_for(tmp_path, student, ensemble, objective=both), batch_of_plain())[0]
    kd_only = loss_and_grads(trainer_for(tmp_path, student, ensemble), batch_of_plain())[0]
    torch.testing.assert_close(combined, kd_only + losses["b"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="--feature_teacher 'c' is none of the teachers: a, b"):
        TeacherEnsemble([TeacherMember(a, "a"), TeacherMember(b, "b")], feature_teacher="c")


def batch_of_plain(rows=4):
    from distily.data import BlockCollator

    return BlockCollator(0)([{"input_ids": row} for row in random_blocks(rows)["input_ids"]])


# -- configuration -----------------------------------------------------------------------------------------------


def test_repeated_teacher_flags_and_yaml_teachers(tmp_path):
    from distily.cli import parse_with_yaml

    classes = (TeacherArguments, DataArguments)
    single, _ = parse_with_yaml(["--teacher", "A"], classes=classes)
    assert single.teacher == "A" and single.teachers is None and single.teacher_names == ["A"]
    several, _ = parse_with_yaml(
        ["--teacher", "A", "--teacher", "B", "--teacher_weights", "1,3", "--teacher_devices", ",cpu"], classes=classes
    )
    assert several.teacher == "A"
    assert several.teachers == [
        {"teacher": "A", "weight": 1.0, "device": None},
        {"teacher": "B", "weight": 3.0, "device": "cpu"},
    ]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("teacher: X\nteachers: [{teacher: A, weight: 1}, {teacher: B, weight: 3, device: cpu}]\n")
    with pytest.raises(ConfigError, match="not the first entry of teachers"):
        parse_with_yaml(["--config", str(yaml_file)], classes=classes)
    yaml_file.write_text("teachers: [{teacher: A, weight: 1}, {teacher: B, weight: 3, device: cpu}]\n")
    from_yaml, _ = parse_with_yaml(["--config", str(yaml_file)], classes=classes)
    assert from_yaml == several
    yaml_file.write_text("teacher: Y\n")
    overridden, _ = parse_with_yaml(["--config", str(yaml_file), "--teacher", "A"], classes=classes)
    assert overridden.teacher == "A" and overridden.teachers is None  # a flag overrides the file, as ever
    # The saved config reloads to the same object.
    from distily.config import config_to_dict, configs_from_dict

    (reloaded,) = configs_from_dict(config_to_dict(several), classes=(TeacherArguments,))
    assert reloaded == several


@pytest.mark.parametrize("weights", ["1,0", "1,-2", "1,nan", "1,x"])
def test_a_teacher_weight_that_is_not_positive_is_refused(weights):
    with pytest.raises(ConfigError, match="--teacher_weights"):
        TeacherArguments(teacher=["A", "B"], teacher_weights=weights)
    with pytest.raises(ConfigError, match="must be a positive"):
        TeacherEnsemble([TeacherMember(None, "a", 1.0, cache=object()), TeacherMember(None, "b", 0.0, cache=object())])


def routed_corpus(tmp_path, names):
    path = tmp_path / "routed.jsonl"
    import json

    lines = [
        json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 3, "who": names[i % len(names)]}) for i in range(60)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_routing_column_packs_each_tokens_teacher(tmp_path, tiny_tokenizer):
    path = routed_corpus(tmp_path, ["A", "B", "B"])
    args = DataArguments(dataset=str(path), eval_fraction=0.2, dataset_cache_dir=str(tmp_path / "cache"))
    plain = prepare_datasets(args, tiny_tokenizer, 16)
    routed = prepare_datasets(args, tiny_tokenizer, 16, routing=("who", ["A", "B"]))
    assert routed.train["input_ids"] == plain.train["input_ids"]  # the same blocks, plus each token's teacher
    # Rebuild the expected routes from the documents.
    from distily.data import load_documents

    documents = load_documents(args)["train"]
    expected = []
    for text, who in zip(documents["text"], documents["who"], strict=True):
        expected += [0 if who == "A" else 1] * (len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)
    flat = [t for block in routed.train["teacher_ids"] for t in block]
    assert flat == expected[: len(flat)] and set(flat) == {0, 1}
    with pytest.raises(DataError, match="names teacher 'B', which is none of the teachers: A, C"):
        prepare_datasets(args, tiny_tokenizer, 16, routing=("who", ["A", "C"]))
    with pytest.raises(DataError, match="--teacher_column 'nope' is not a column"):
        prepare_datasets(args, tiny_tokenizer, 16, routing=("nope", ["A", "B"]))


def save_teacher(folder, tokenizer, seed):
    tiny(seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_args(tmp_path, dataset, config_overrides=None, **teacher):
    from distily import DistillationConfig

    config = DistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        **{"seq_len": 16, **(config_overrides or {})},
    )  # fmt: skip
    return dict(
        teacher_args=TeacherArguments(teacher_dtype="float32", **teacher),
        student_args=StudentArguments(student_config={"num_hidden_layers": 1}),
        data_args=DataArguments(dataset=str(dataset), eval_fraction=0.2, max_eval_blocks=4),
        config=config,
    )


def test_teachers_whose_tokenizers_differ_are_refused_before_anything_is_written(tmp_path, tiny_tokenizer):
    other = make_tiny_tokenizer(["completely different text, other merges " * 20])
    a = save_teacher(tmp_path / "a", tiny_tokenizer, 0)
    b = save_teacher(tmp_path / "b", other, 1)
    dataset = routed_corpus(tmp_path, ["a"])
    with pytest.raises(ConfigError, match=r"tokenizers differ: .*b.* tokenise differently from"):
        train(**run_args(tmp_path, dataset, teacher=[a, b]))
    assert not (tmp_path / "run").exists()
    # A routing column naming an unknown teacher: refused while packing, before the run folder exists.
    c = save_teacher(tmp_path / "c", tiny_tokenizer, 1)
    with pytest.raises(DataError, match="which is none of the teachers"):
        train(**run_args(tmp_path, dataset, teacher=[a, c], teacher_column="who"))
    assert not (tmp_path / "run").exists()


def test_a_run_with_two_teachers_lists_both_in_its_manifest(tmp_path, tiny_tokenizer):
    import json

    a = save_teacher(tmp_path / "a", tiny_tokenizer, 0)
    b = save_teacher(tmp_path / "b", tiny_tokenizer, 1)
    dataset = routed_corpus(tmp_path, [a, b])
    result = train(**run_args(tmp_path, dataset, teacher=[a, b], teacher_weights="1,3", teacher_column="who"))
    manifest = json.loads((result.output_dir / "distily_run.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == [a, b]
    assert [t["weight"] for t in manifest["teachers"]] == pytest.approx([0.25, 0.75])
    assert manifest["teachers"][0]["features"] and manifest["teachers"][1]["parameters"] > 0
    assert result.metrics_after["eval_student_ppl"] > 0
    from distily.export import export

    export(result.output_dir, ["safetensors"], "f32", tmp_path / "exported")
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "distilled from 2 teachers at once, each example routed to the teacher its `who` column names" in card
    assert f"| `{a}` | 0.25 |" in card and f"| `{b}` | 0.75 |" in card


def test_two_recorded_teachers_train_from_their_caches(tmp_path, teacher_dir, text_corpus):  # noqa: F811
    import json

    from distily.teacher.recorded import record

    from .test_record import record_args

    caches = []
    for name in ("c1", "c2"):
        caches.append(str(tmp_path / name))
        record(*record_args(teacher_dir, text_corpus, tmp_path / name, tail_samples=0), progress=False)
    args = run_args(tmp_path, text_corpus, {"teacher_cache": ",".join(caches), "seq_len": 32})
    args["teacher_args"] = TeacherArguments(teacher_weights="1,3")
    args["data_args"] = DataArguments(
        dataset=str(text_corpus), eval_fraction=0.1, max_train_blocks=20, max_eval_blocks=6
    )
    result = train(**args)
    manifest = json.loads((result.output_dir / "distily_run.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == caches
    assert [t["weight"] for t in manifest["teachers"]] == pytest.approx([0.25, 0.75])
    assert result.metrics_after["eval_teacher_ppl"] == pytest.approx(result.metrics_before["eval_teacher_ppl"])
