"""Prune, then distil: structured pruning by importance against today's layer-subset and random starts.

Teacher: the embedded SmolLM2-135M-Instruct (30 layers, non-embedding parameters ≈ 106 M); corpus: python-stdlib,
4 × 128-token batches, the demo's objective and schedule (configs/demo.yaml). Two budgets of non-embedding
parameters, about 50 % and about 13 % (the demo's 4-layer student), and five starts for each:

  (a) ``subset``: today's uniform layer subset keeping the first and the last (``--student_init auto``);
  (b) ``depth``: the layers ranked best by the layer score;
  (c) ``width``: all 30 layers, heads, MLP neurons and hidden channels cut by importance, the shape searched
      (``WIDTH_SEARCH``: the hidden size and heads whose cut start is best on the selection blocks);
  (d) ``width_depth``: both;
  (e) ``random``: random init of (c)'s shape.

Importance is measured once on the teacher (the default calibration blocks of the train split) and every pruned
start is cut from it; the same measurement at 4× the blocks gives the rank overlap of the kept units. The
aggregation and the layer score the variants use are chosen first, on 16 further train-split blocks (never the
eval split): the one whose cut start has the lowest perplexity there. Each start is saved as a model folder and
trained by ``distily.run.train`` with ``--student FOLDER`` (the ``distily`` command's path) for ``--steps`` equal
steps; eval perplexity at step 0, halfway and at the end, on the eval split and on held-out English prose no run
saw (the long ``METADATA`` descriptions of the venv's packages and /usr/share/common-licenses, as the BitNet
benchmark did).

    python benchmarks/prune_vs_init.py --steps 100 --out runs/bench-prune           # everything
    python benchmarks/prune_vs_init.py --steps 200 --budgets 50 --out runs/bench-prune-200
    python benchmarks/prune_vs_init.py --budgets 50 13 --budget_steps 50:200 13:60 --skip 50-random
    python benchmarks/prune_vs_init.py --quick                                      # a 2-step smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distily.config import DataArguments, configs_from_dict, train_kwargs  # noqa: E402
from distily.config.prune import AGGREGATIONS, DEFAULT_CALIBRATION_BLOCKS, LAYER_SCORES  # noqa: E402
from distily.data import prepare_datasets  # noqa: E402
from distily.evaluate import perplexity  # noqa: E402
from distily.modeling import count_parameters  # noqa: E402
from distily.pruning import choose, family_of, measure_importance, resolve_target, trim  # noqa: E402
from distily.pruning.command import calibration_blocks  # noqa: E402
from distily.run import train  # noqa: E402
from distily.students import build_student  # noqa: E402
from distily.teacher.loading import load_teacher  # noqa: E402

SEQ_LEN = 128
# Non-embedding budgets: targets sized to ≈ 50 % and ≈ 13 % of the teacher's 106.2 M (see the printed table).
BUDGETS = {
    "50": {
        "subset": {"num_hidden_layers": 15},
        "depth": {"num_hidden_layers": 15},
        "width": {"hidden_size": 450, "num_attention_heads": 6, "intermediate_size": 928},
        "width_depth": {
            "num_hidden_layers": 20,
            "hidden_size": 516,
            "num_attention_heads": 6,
            "intermediate_size": 1328,
        },
    },
    "13": {
        "subset": {"num_hidden_layers": 4},
        "depth": {"num_hidden_layers": 4},
        "width": {"hidden_size": 264, "num_attention_heads": 3, "intermediate_size": 336},
        "width_depth": {
            "num_hidden_layers": 10,
            "hidden_size": 384,
            "num_attention_heads": 6,
            "intermediate_size": 832,
        },
    },
}


# (c)'s shape at each budget is searched, not guessed: every hidden size and query-head count below (key/value
# groups kept, or whole groups dropped) with the MLP width that fills the budget of the layer subset (a); the one
# whose cut start has the lowest perplexity on the selection blocks (train split, neither calibration nor eval)
# is (c), and (e) takes its shape. Hidden sizes are multiples of the head counts (LlamaConfig refuses others).
WIDTH_SEARCH = {
    "50": {"hidden_size": (396, 450, 504, 540, 576), "num_attention_heads": (6, 9)},
    "13": {"hidden_size": (198, 264, 330), "num_attention_heads": (3, 6)},
}
MIN_INTERMEDIATE = 128


def non_embedding(model) -> int:
    return count_parameters(model) - model.get_input_embeddings().weight.numel()


def llama_non_embedding(shape: dict) -> int:
    """Non-embedding parameters of a bias-free Llama of ``shape`` (q, k, v, o, gate, up, down, two norms per
    layer, the final norm); checked against the teacher's count in :func:`main`."""
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim, inter, layers = shape["head_dim"], shape["intermediate_size"], shape["num_hidden_layers"]
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + hidden


def width_candidates(teacher_shape: dict, goal: int, search: dict) -> list[dict]:
    """Every searched (hidden size, heads, key/value groups) with the widest MLP (a multiple of 8) within ``goal``
    non-embedding parameters; all layers kept."""
    group = teacher_shape["num_attention_heads"] // teacher_shape["num_key_value_heads"]
    shapes = []
    for hidden in search["hidden_size"]:
        for heads in search["num_attention_heads"]:
            if hidden % heads:
                continue
            for kv in sorted({teacher_shape["num_key_value_heads"], heads // group} - {0}):
                if heads % kv or heads // kv > group:
                    continue
                shape = {**teacher_shape, "hidden_size": hidden, "num_attention_heads": heads,
                         "num_key_value_heads": kv, "intermediate_size": 0}  # fmt: skip
                per_neuron = 3 * hidden * shape["num_hidden_layers"]
                inter = min((goal - llama_non_embedding(shape)) // per_neuron // 8 * 8,
                            teacher_shape["intermediate_size"])  # fmt: skip
                if inter >= MIN_INTERMEDIATE:
                    shapes.append({"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
                                   "intermediate_size": int(inter)})  # fmt: skip
    return shapes


def prose_blocks(tokenizer, blocks: int):
    """Held-out English prose: long package descriptions and licence texts, packed into SEQ_LEN-token blocks."""
    from datasets import Dataset

    site = Path(sysconfig.get_paths()["purelib"])
    texts = []
    for path in sorted(site.glob("*.dist-info/METADATA")) + sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file() and path.stat().st_size > 4096:
            text = path.read_text(errors="ignore")
            texts.append(text.split("\n\n", 1)[-1] if path.name == "METADATA" else text)
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= blocks * SEQ_LEN:
            break
    rows = [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(min(blocks, len(ids) // SEQ_LEN))]
    return Dataset.from_dict({"input_ids": rows}), len(texts)


def overlap(a: list, b: list) -> float:
    return len(set(a) & set(b)) / max(len(a), 1)


def plan_overlap(first, second) -> dict[str, float]:
    """Share of the kept units the two plans agree on, per kind (heads and neurons over the layers both keep)."""
    common = [layer for layer in first.layers if layer in second.layers]
    result = {"layers": overlap(first.layers, second.layers), "channels": overlap(first.channels, second.channels)}
    for kind in ("query_heads", "neurons"):
        a = [
            (lay, u)
            for lay, units in zip(first.layers, getattr(first, kind), strict=True)
            if lay in common
            for u in units
        ]
        b = [
            (lay, u)
            for lay, units in zip(second.layers, getattr(second, kind), strict=True)
            if lay in common
            for u in units
        ]
        result[kind] = overlap(a, b)
    return result


def train_start(name: str, start_dir: Path, teacher, tokenizer, steps: int, args) -> dict:
    values = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    values.update(
        student=str(start_dir),
        student_config=None,
        output_dir=str(Path(args.out) / name / "run"),
        seq_len=SEQ_LEN,
        max_steps=steps,
        max_train_seconds=None,
        max_eval_blocks=args.eval_blocks,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, steps // 10),
        warmup_steps=min(values["warmup_steps"], steps // 2),
        eval_strategy="steps",
        eval_steps=max(1, steps // 2),
        save_strategy="no",
        export=None,
    )
    run_args = train_kwargs(configs_from_dict(values, source=f"variant {name}"))
    result = train(**run_args, command=["benchmarks/prune_vs_init.py", name], loaded_teacher=(teacher, tokenizer))
    history = [e["eval_student_ppl"] for e in result.trainer.state.log_history if "eval_student_ppl" in e]
    return {
        "eval_ppl_0": result.metrics_before["eval_student_ppl"],
        "eval_ppl_half": history[0] if len(history) > 1 else None,
        "eval_ppl": result.metrics_after["eval_student_ppl"],
        "teacher_ppl": result.metrics_before.get("eval_teacher_ppl"),
        "seconds_per_step": result.train_metrics["train_runtime"] / max(steps, 1),
        "student": result.trainer.model,
    }


def run_start(name, budget, variant, teacher, tokenizer, family, importance, aggregation, layer_score, prose,
              steps, teacher_non_embedding, args) -> dict:  # fmt: skip
    """Build one start, save it, train it, and its figures."""
    out = Path(args.out)
    started = time.perf_counter()
    if variant == "subset":
        model = build_student(teacher, BUDGETS[budget]["subset"])
    elif variant == "random":
        width = resolve_target(teacher.config, family, BUDGETS[budget]["width"])
        shaped = trim(teacher, family, choose(importance, width, aggregation, layer_score))
        torch.manual_seed(42)
        model = type(shaped)(shaped.config)
        model.config.distily_init = {"from": "random"}
    else:
        target = resolve_target(teacher.config, family, BUDGETS[budget][variant])
        model = trim(teacher, family, choose(importance, target, aggregation, layer_score))
    build_seconds = time.perf_counter() - started
    start_dir = out / name / "start"
    model.save_pretrained(start_dir)
    tokenizer.save_pretrained(start_dir)
    prose_0 = perplexity(model, prose, batch_size=8)["perplexity"]
    row = train_start(name, start_dir, teacher, tokenizer, steps, args)
    student = row.pop("student")
    row.update(
        non_embedding=non_embedding(model),
        budget_share=non_embedding(model) / teacher_non_embedding,
        prose_ppl_0=prose_0,
        prose_ppl=perplexity(student, prose, batch_size=8)["perplexity"],
        build_seconds=build_seconds,
        layers=(model.config.distily_init or {}).get("teacher_layers"),
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--budget_steps", nargs="*", default=[], help="per-budget steps overriding --steps, e.g. 50:60 13:30"
    )
    parser.add_argument(
        "--max_seconds", type=float, default=None, help="start no variant after this many seconds (a time budget)"
    )
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--variants", nargs="+", default=["subset", "depth", "width", "width_depth", "random"])
    parser.add_argument("--skip", nargs="*", default=[], help="variants not to run, e.g. 50-random (reported)")
    parser.add_argument("--calibration_blocks", type=int, default=DEFAULT_CALIBRATION_BLOCKS)
    parser.add_argument("--eval_blocks", type=int, default=16)
    parser.add_argument("--out", default="runs/bench-prune")
    parser.add_argument("--quick", action="store_true", help="2 steps, 8 calibration blocks, one budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.calibration_blocks, args.budgets, args.eval_blocks = 2, 8, ["13"], 4
        args.budget_steps = []
    budget_steps = {budget: args.steps for budget in BUDGETS}
    budget_steps.update({item.split(":")[0]: int(item.split(":")[1]) for item in args.budget_steps})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    torch.manual_seed(0)
    teacher, tokenizer = load_teacher("smollm2-135m-instruct", dtype="float32")
    family = family_of(teacher.config)
    for budget in BUDGETS.values():  # every target checked before any work
        for target in budget.values():
            resolve_target(teacher.config, family, target)
    data_args = DataArguments(dataset="python-stdlib", max_eval_blocks=args.eval_blocks)
    data = prepare_datasets(data_args, tokenizer, SEQ_LEN, seed=42)
    blocks = args.calibration_blocks
    ids, info = calibration_blocks(data_args, tokenizer, SEQ_LEN, blocks, 42, "--calibration_blocks")
    permutation = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(42)).tolist()
    assert sorted(permutation[:blocks]) == info["block_rows"]  # the library's sample: a prefix of this permutation
    rows_4x = sorted(permutation[: 4 * blocks])
    ids_4x = torch.tensor([data.train[r]["input_ids"] for r in rows_4x])
    select = perplexity_blocks = data.train.select(permutation[4 * blocks : 4 * blocks + 16])
    prose, prose_files = prose_blocks(tokenizer, args.eval_blocks)
    results: dict = {"command": " ".join(sys.argv), "calibration_blocks": blocks, "seq_len": SEQ_LEN}
    results["steps"] = {budget: budget_steps[budget] for budget in args.budgets}
    results["skipped"] = []

    started = time.perf_counter()
    importance = measure_importance(teacher, family, ids, progress=False)
    results["calibration_seconds"] = time.perf_counter() - started
    results["calibration_phases"] = importance.seconds
    started = time.perf_counter()
    importance_4x = measure_importance(teacher, family, ids_4x, progress=False)
    results["calibration_seconds_4x"] = time.perf_counter() - started
    results["teacher_non_embedding"] = non_embedding(teacher)
    print(f"importance: {results['calibration_seconds']:.1f} s ({blocks} blocks), "
          f"{results['calibration_seconds_4x']:.1f} s ({4 * blocks} blocks)", flush=True)  # fmt: skip

    # Choices, on train-split blocks that are neither calibration nor eval.
    def select_ppl(model) -> float:
        return perplexity(model.eval(), perplexity_blocks, batch_size=8)["perplexity"]

    width_target = resolve_target(teacher.config, family, BUDGETS["50"]["width"])
    depth_target = resolve_target(teacher.config, family, BUDGETS["50"]["depth"])
    results["aggregation_choice"] = {
        agg: select_ppl(trim(teacher, family, choose(importance, width_target, agg, "block_importance")))
        for agg in AGGREGATIONS
    }
    aggregation = min(results["aggregation_choice"], key=results["aggregation_choice"].get)
    results["layer_score_choice"] = {
        score: select_ppl(trim(teacher, family, choose(importance, depth_target, aggregation, score)))
        for score in LAYER_SCORES
    }
    layer_score = min(results["layer_score_choice"], key=results["layer_score_choice"].get)
    results.update(aggregation=aggregation, layer_score=layer_score, selection_blocks=len(select))
    print(f"chosen: aggregation {aggregation} {results['aggregation_choice']}, "
          f"layer score {layer_score} {results['layer_score_choice']}", flush=True)  # fmt: skip

    teacher_shape = family.shape(teacher.config).as_dict()
    assert llama_non_embedding(teacher_shape) == non_embedding(teacher), "the parameter formula is off"
    results["width_search"] = {}
    for budget in args.budgets:
        goal = llama_non_embedding({**teacher_shape, **BUDGETS[budget]["subset"]})
        trials = {}
        for shape in width_candidates(teacher_shape, goal, WIDTH_SEARCH[budget]):
            target = resolve_target(teacher.config, family, shape)
            trials[json.dumps(shape)] = select_ppl(trim(teacher, family, choose(importance, target, aggregation,
                                                                                 layer_score)))  # fmt: skip
        best = min(trials, key=trials.get)
        BUDGETS[budget]["width"] = json.loads(best)
        results["width_search"][budget] = {"goal_non_embedding": goal, "perplexity": trials, "chosen": best}
        print(f"width search, budget {budget}: chose {best} of {json.dumps(trials)}", flush=True)

    results["overlap_4x"] = {}
    for budget in args.budgets:
        target = resolve_target(teacher.config, family, BUDGETS[budget]["width_depth"])
        plans = [choose(imp, target, aggregation, layer_score) for imp in (importance, importance_4x)]
        results["overlap_4x"][budget] = plan_overlap(*plans)
    results["teacher_prose_ppl"] = perplexity(teacher, prose, batch_size=8)["perplexity"]

    results["variants"] = {}
    for budget in args.budgets:
        for variant in args.variants:
            name = f"{budget}-{variant}"
            if name in args.skip:
                results["skipped"].append(f"{name} (--skip)")
                continue
            if args.max_seconds is not None and time.perf_counter() - begun > args.max_seconds:
                results["skipped"].append(name)  # the time budget is spent: reported, not run
                continue
            try:
                row = run_start(name, budget, variant, teacher, tokenizer, family, importance, aggregation, layer_score,
                                prose, budget_steps[budget], results["teacher_non_embedding"], args)  # fmt: skip
            except Exception as err:  # one variant's failure is reported; the others still run
                results["skipped"].append(f"{name}: {type(err).__name__}: {err}")
                print(f"{name} failed: {err}", flush=True)
                continue
            results["variants"][name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| variant | non-emb params | share | eval ppl step 0 | half | end | prose ppl 0 | prose end | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results["variants"].items():
        half = f"{row['eval_ppl_half']:,.1f}" if row["eval_ppl_half"] else "n/a"
        print(f"| {name} | {row['non_embedding'] / 1e6:.1f} M | {100 * row['budget_share']:.0f} % | "
              f"{row['eval_ppl_0']:,.1f} | {half} | {row['eval_ppl']:,.2f} | {row['prose_ppl_0']:,.1f} | "
              f"{row['prose_ppl']:,.1f} | {row['seconds_per_step']:.2f} |")  # fmt: skip
    print(f"\nsteps {results['steps']}, skipped {results['skipped']}, total {time.perf_counter() - begun:.0f} s")
    print(f"\nteacher eval ppl {row['teacher_ppl']:.3f}, prose ppl {results['teacher_prose_ppl']:.3f} "
          f"({prose_files} prose files); overlap at 4x: {results['overlap_4x']}")  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
