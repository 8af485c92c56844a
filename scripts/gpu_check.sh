#!/usr/bin/env bash
# GPU check: on one CUDA GPU, within 10 minutes, run the CUDA tests, the speed benchmark of the paper's 256x256 model
# and a short 256x256 training + sampling run, every result in one folder.
#
#   bash scripts/gpu_check.sh [--out DIR] [--reference PATH] [--budget SECONDS] [--parts LIST]
#   bash scripts/gpu_check.sh --dry [--out DIR]     # the same parts at tiny sizes on a CPU, in about a minute
#
#   --out DIR         where every result goes (a new or empty folder; default gpu_check_<date>_<time>)
#   --reference PATH  a clone of jychoi118/P2-weighting: adds the reference code to the benchmark (needs mpi4py)
#   --budget SECONDS  wall-clock limit of the whole check (default 570; --dry: 600, with limits generous enough for
#                     a busy CPU); no part runs past it
#   --parts LIST      run only these of tests,train,sample,benchmark,benchmark_compile (default: all; train
#                     includes data; sample needs train), e.g. to rerun a part that timed out
#   --dry             CPU rehearsal (CI runs it, so the script cannot rot): the CUDA tests are collected and skipped,
#                     the benchmark times tiny16, training is 4 steps of a 32 px model on 16 images, 2 samples
#
# Parts, in order; each has its own time limit (below, GPU / --dry), cut to what is left of the budget:
#   env                python, torch, the GPU and the packages the parts import    env.log, env.json
#   tests              python -m pytest -m cuda tests/test_cuda.py                 tests.log, pytest_cuda.xml
#   data               structured PNGs to train on (256 at 256 px / 16 at 32 px)    data/
#   train              configs/ffhq_p2.yaml for 300 steps (--dry: a 32 px model)    train/ (progress.csv, log.txt)
#   sample             8 samples over 50 respaced steps from the trained weights    samples/ (npz, PNGs, grid.png)
#   benchmark          python -m benchmarks --config p2_256: [reference,]eager,channels_last,bf16
#                                                                                   benchmark.json, benchmark.md
#   benchmark_compile  the same for eager,compile,compile+bf16 (compilation takes minutes, so it runs last and
#                      alone: a timeout there loses nothing else)               benchmark_compile.json, .md
# Then summary.md and summary.json. A failed part does not stop the others (sampling needs train's checkpoint);
# the exit status is 0 if every part passed, 1 otherwise, 2 for bad arguments.
# Needs, beside torch: numpy pillow pyyaml tqdm blobfile clean-fid scipy pytest (and triton, which comes with CUDA
# builds of torch, for torch.compile); env.log names any missing one and the parts it fails. Runs with
# ${PYTHON:-python}; the code is this checkout's (PYTHONPATH).

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
DRY=0
OUT=""
REFERENCE=""
BUDGET=""
ALL_PARTS=tests,train,sample,benchmark,benchmark_compile
PARTS=$ALL_PARTS

die() {
    echo "gpu_check.sh: error: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --dry) DRY=1 ;;
        --out | --reference | --budget | --parts)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --out) OUT=$2 ;;
                --reference) REFERENCE=$2 ;;
                --budget) BUDGET=$2 ;;
                --parts) PARTS=$2 ;;
            esac
            shift ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then
    BUDGET=${BUDGET:-600}
    export CUDA_VISIBLE_DEVICES=""   # a CPU rehearsal, also on a machine with a GPU
    LIMITS="env=60 tests=180 data=60 train=180 sample=120 benchmark=120 benchmark_compile=120"  # a busy CPU too
    IMAGES=16 SIZE=32 STEPS=4 SAMPLES=2 RESPACING=5
    TRAIN_FLAGS="--image_size 32 --num_channels 32 --channel_mult 1,2 --attention_resolutions 16
        --num_head_channels 32 --diffusion_steps 100 --batch_size 4 --log_interval 2 --num_workers 0"
    BENCH_FLAGS="--config tiny16 --warmup 0 --repeats 1 --threads 1"
    BENCH_SETTINGS=eager
    COMPILE_SETTINGS=channels_last   # compiling takes minutes on a CPU: the part runs, without compile
else
    BUDGET=${BUDGET:-570}
    LIMITS="env=60 tests=150 data=60 train=150 sample=90 benchmark=150 benchmark_compile=330"
    IMAGES=256 SIZE=256 STEPS=300 SAMPLES=8 RESPACING=50
    TRAIN_FLAGS="--log_interval 25 --num_workers 4"
    BENCH_FLAGS="--config p2_256"
    BENCH_SETTINGS=eager,channels_last,bf16
    COMPILE_SETTINGS=eager,compile,compile+bf16
fi
case $BUDGET in '' | *[!0-9]*) die "--budget must be a whole number of seconds, got '$BUDGET'" ;; esac
for part in ${PARTS//,/ }; do
    case ,$ALL_PARTS, in *,$part,*) ;; *) die "--parts: '$part' is not one of $ALL_PARTS" ;; esac
done
if [ -n "$REFERENCE" ]; then
    [ -d "$REFERENCE" ] || die "--reference $REFERENCE is not a folder (a clone of jychoi118/P2-weighting)"
    REFERENCE=$(cd "$REFERENCE" && pwd)
    BENCH_SETTINGS=reference,$BENCH_SETTINGS
fi
command -v "$PY" > /dev/null || die "no Python interpreter '$PY' (set PYTHON=/path/to/python)"

OUT=${OUT:-gpu_check_$(date +%Y%m%d_%H%M%S)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2> /dev/null)" ]; then
    die "--out $OUT is not empty; pass a new folder"
fi
mkdir -p "$OUT" || die "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PARTS_FILE="$OUT/parts.tsv"
printf 'part\tstatus\texit_code\tseconds\tlimit_s\n' > "$PARTS_FILE"
FAILED=0
SECONDS=0

wanted() {
    case ,$PARTS, in *,$1,*) return 0 ;; *) return 1 ;; esac
}

limit_of() {
    local entry
    for entry in $LIMITS; do
        [ "${entry%%=*}" = "$1" ] && echo "${entry#*=}"
    done
}

record() {  # record PART STATUS EXIT_CODE SECONDS LIMIT
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$PARTS_FILE"
    [ "$2" = passed ] || FAILED=1
    echo "== $1: $2 (${4}s)"
}

run_part() {  # run_part PART COMMAND...: run it under the part's time limit, output to the terminal and PART.log
    local part=$1 limit left start code status
    shift
    limit=$(limit_of "$part")
    left=$((BUDGET - SECONDS))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$part" "not run: the ${BUDGET}s budget is used up" "" 0 "$limit"
        return
    fi
    echo
    echo "== $part (limit ${limit}s): $*"
    start=$SECONDS
    # timeout signals the command's whole process group (benchmark workers, data loader workers).
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$part.log"
    code=${PIPESTATUS[0]}
    case $code in
        0) status=passed ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit code $code)" ;;
    esac
    record "$part" "$status" "$code" $((SECONDS - start)) "$limit"
}

echo "gpu_check.sh: $([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU check"), results in $OUT," \
    "budget ${BUDGET}s, python $(command -v "$PY")"

# ---------------------------------------------------------------------------------------------------------------
run_part env "$PY" - "$DRY" "$OUT/env.json" "$REFERENCE" << 'EOF'
import importlib, json, platform, shutil, subprocess, sys

dry, path, reference = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
# What imports each package; a missing one fails those parts only (the machine may be offline: no pip there).
users = {"numpy": "all", "PIL": "all", "yaml": "all", "tqdm": "all", "blobfile": "tests, train",
         "cleanfid": "tests, train, sample", "scipy": "tests, train", "pytest": "tests"}
if reference:
    users["mpi4py"] = "benchmark (the reference code)"
if not dry:
    users["triton"] = "tests (compile), benchmark_compile"
versions, missing = {}, {}
for module in ["torch", *users]:
    try:
        versions[module] = str(getattr(importlib.import_module(module), "__version__", "installed"))
    except ImportError:
        missing[module] = users.get(module, "all")
if "torch" in missing:
    sys.exit("torch is not installed for this python: every part needs it (set PYTHON=/path/to/python)")
import torch
import guided_diffusion
info = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
            packages=versions, missing=missing, dry=dry, torch_cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available(),
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            guided_diffusion=guided_diffusion.__file__)
if shutil.which("nvidia-smi") and not dry:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout)
with open(path, "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info, indent=1))
for module, parts in missing.items():
    print(f"warning: {module} is not installed; these parts will fail: {parts}")
if not dry and not info["cuda_available"]:
    sys.exit("torch sees no CUDA GPU (torch.cuda.is_available() is False); on a CPU use --dry")
EOF
if [ "$FAILED" = 1 ]; then
    echo "gpu_check.sh: the environment check failed (see $OUT/env.log); nothing else was run" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------------------------
wanted tests && run_part tests "$PY" -m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider \
    --durations=10 --junitxml "$OUT/pytest_cuda.xml"

# ---------------------------------------------------------------------------------------------------------------
wanted train && run_part data "$PY" - "$OUT/data" "$IMAGES" "$SIZE" << 'EOF'
"""Structured images (a vertical colour gradient, a disc, mild noise), so that the training loss can fall."""
import os, sys
import numpy as np
from PIL import Image

folder, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(folder, exist_ok=True)
rng = np.random.default_rng(0)
y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
for i in range(count):
    top, bottom, disc = rng.uniform(0, 255, (3, 3))
    image = top + (bottom - top) * y[..., None]
    cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
    image[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = disc
    image += rng.normal(0, 6, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
print(f"wrote {count} PNGs of {size}x{size} to {folder}")
EOF

# ---------------------------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # TRAIN_FLAGS is a word list
wanted train && run_part train "$PY" scripts/image_train.py --config configs/ffhq_p2.yaml $TRAIN_FLAGS \
    --data_dir "$OUT/data" --log_dir "$OUT/train" --max_steps "$STEPS" --save_interval "$STEPS"

# The raw weights: an EMA rate of 0.9999 keeps 97% of the initial weights after 300 steps.
CHECKPOINT="$OUT/train/model$(printf %06d "$STEPS").pt"
if wanted sample && [ -f "$CHECKPOINT" ]; then
    run_part sample "$PY" scripts/image_sample.py --model_path "$CHECKPOINT" --timestep_respacing "$RESPACING" \
        --num_samples "$SAMPLES" --batch_size "$SAMPLES" --sample_dir "$OUT/samples"
elif wanted sample; then
    record sample "not run: training left no $CHECKPOINT" "" 0 ""
fi

# ---------------------------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_FLAGS is a word list
wanted benchmark && run_part benchmark "$PY" -m benchmarks $BENCH_FLAGS --settings "$BENCH_SETTINGS" \
    ${REFERENCE:+--reference_path "$REFERENCE"} --no_progress --out "$OUT/benchmark.json" \
    --markdown "$OUT/benchmark.md"
# shellcheck disable=SC2086
wanted benchmark_compile && run_part benchmark_compile "$PY" -m benchmarks $BENCH_FLAGS \
    --settings "$COMPILE_SETTINGS" --no_progress --out "$OUT/benchmark_compile.json" \
    --markdown "$OUT/benchmark_compile.md"

# ---------------------------------------------------------------------------------------------------------------
echo
"$PY" - "$OUT" << 'EOF'
"""summary.md and summary.json from the parts' files."""
import csv, glob, json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
with open(os.path.join(out, "parts.tsv"), newline="") as f:
    parts = list(csv.DictReader(f, delimiter="\t"))
summary = {"parts": parts}
lines = ["# GPU check" + (" (dry run)" if json.load(open(os.path.join(out, "env.json"))).get("dry") else ""), "",
         "| part | status | seconds | limit s |", "|---|---|---:|---:|"]
lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for p in parts]
junit = os.path.join(out, "pytest_cuda.xml")
if os.path.exists(junit):
    cases = ET.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["skipped" if kind == "skipped" else "passed" if kind == "passed" else "failed"] += 1
    summary["tests"] = counts
    lines += ["", "CUDA tests: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + " (tests.log)"]
progress = os.path.join(out, "train", "progress.csv")
if os.path.exists(progress):
    with open(progress, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("loss")]
    if rows:
        first, last = rows[0], rows[-1]
        summary["training"] = {"first": first, "last": last}
        lines += ["", f"Training: loss {float(first['loss']):.4f} at step {first['step']} -> {float(last['loss']):.4f} "
                  f"at step {last['step']}; {float(last['images_per_s']):.1f} images/s (train/progress.csv)"]
samples = glob.glob(os.path.join(out, "samples", "samples_*.npz"))
if samples:
    summary["samples"] = os.path.relpath(samples[0], out)
    lines += ["", f"Samples: {summary['samples']} and samples/grid.png"]
for name in ("benchmark", "benchmark_compile"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        continue
    result = json.load(open(path))
    rows = [{"setting": setting, "step": phase, "images_per_s": e["images_per_s"],
             "peak_memory_mib": e["memory"]["peak_increase_mib"], "matmul_peak_fraction": e["matmul_peak_fraction"],
             "matmul_peak_dtype": e["matmul_peak_dtype"]}
            for setting, phases in result["results"].items() for phase, e in phases.items()]
    summary[name] = rows
    lines += ["", f"{name} ({result['meta']['config']} on {result['meta']['machine']}; full table: {name}.md):", "",
              "| setting | step | images/s | peak memory +MiB | of matmul peak |", "|---|---|---:|---:|---:|"]
    for r in rows:
        share = "-" if r["matmul_peak_fraction"] is None else f"{100 * r['matmul_peak_fraction']:.1f}% ({r['matmul_peak_dtype']})"
        lines.append(f"| {r['setting']} | {r['step']} | {r['images_per_s']:.1f} | {r['peak_memory_mib']:.0f} | {share} |")
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(text)
EOF
[ $? = 0 ] || FAILED=1

if [ "$FAILED" = 0 ]; then
    echo "gpu_check.sh: every part passed (${SECONDS}s); results in $OUT"
else
    echo "gpu_check.sh: some parts did not pass (${SECONDS}s); see $OUT/summary.md and the parts' logs" >&2
fi
exit "$FAILED"
