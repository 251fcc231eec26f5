"""Size and wall time of exporting the demo's student (SmolLM2 cut to 4 layers: teacher layers 0, 10, 19, 29).

    python benchmarks/export_size.py

Builds the student like `make demo` does (no training: sizes and export time do not depend on the weights),
saves it as a model folder and times `distily.export.export` for safetensors+GGUF (defaults f32 / f16, with
the model card) and for a lone q8_0 GGUF file.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def main() -> None:
    from distily import build_student, load_teacher
    from distily.export import export
    from distily.students import count_parameters

    teacher, tokenizer = load_teacher("smollm2-135m-instruct")
    student = build_student(teacher, {"num_hidden_layers": 4}).eval()
    print(
        f"student: {count_parameters(student) / 1e6:.1f}M parameters (teacher {count_parameters(teacher) / 1e6:.1f}M)"
    )
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "student"
        student.save_pretrained(source)
        tokenizer.save_pretrained(source)
        for formats, outtype, output in (
            (["safetensors", "gguf"], None, Path(folder) / "export"),
            (["gguf"], "q8_0", Path(folder) / "student-q8_0.gguf"),
        ):
            started = time.perf_counter()
            result = export(source, formats, outtype, output)
            seconds = time.perf_counter() - started
            for fmt, files in result.files.items():
                weights = [p for p in files if p.suffix in (".safetensors", ".gguf")]
                sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in weights)
                print(f"{fmt:<12} {result.outtypes[fmt]:<5} {sizes}")
            print(f"  export of {'+'.join(formats)} took {seconds:.1f} s")


if __name__ == "__main__":
    main()
