"""Prompts for the synthetic-data worked example (docs/synthetic-data.md), built from the standard library.

Half are questions ("In Python's json module, what does the function dumps() do?"), half are coding tasks taken
from function docstrings ("Write a Python function dumps(obj, ...) that does this: Serialize obj to a JSON
formatted str."). Only modules on the *train* side of distily's python-stdlib split are used, so nothing the
student is evaluated on leaks into its synthetic training data.

    python benchmarks/synth_demo_prompts.py --count 500 --output runs/synth-demo-prompts.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from pathlib import Path

from distily.config import DataArguments
from distily.data import is_eval_key, list_text_files, python_stdlib_root


def functions(root: Path, eval_fraction: float) -> list[dict]:
    """Public top-level functions with a docstring, from train-split stdlib modules, in a stable order."""
    found = []
    for path in list_text_files(root, (".py",)):
        relative = str(path.relative_to(root))
        if is_eval_key(relative, eval_fraction) or "test" in relative or relative.startswith(("idlelib", "lib2to3")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = relative[:-3].replace("/", ".").removesuffix(".__init__")
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            first = doc.strip().split("\n\n")[0].replace("\n", " ").strip() if doc else ""
            if not 20 <= len(first) <= 200:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            found.append({"module": module, "name": node.name, "args": args, "doc": first})
    # Spread over modules: order by a hash instead of alphabetically.
    return sorted(found, key=lambda f: hashlib.sha1(f"{f['module']}.{f['name']}".encode()).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--output", default="runs/synth-demo-prompts.jsonl")
    args = parser.parse_args()
    eval_fraction = DataArguments().eval_fraction  # the split `--dataset python-stdlib` uses
    pool = functions(python_stdlib_root(), eval_fraction)
    rows = []
    for index, item in enumerate(pool[: args.count]):
        if index % 2 == 0:
            prompt = f"In Python's {item['module']} module, what does the function {item['name']}() do?"
            kind = "qa"
        else:
            prompt = (
                f"Write a Python function {item['name']}({item['args']}) that does this: {item['doc']} "
                "Reply with only the code."
            )
            kind = "code"
        rows.append({"prompt": prompt, "kind": kind, "module": item["module"]})
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} prompts ({len(pool)} candidate functions) written to {output}")


if __name__ == "__main__":
    main()
