#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md ("On a GPU") in one prepared run: the Triton and CUDA tests,
# one layer's decode attention alone (bench/bench_attend.py), the decode/TTFT table on random
# weights of the Llama-3-8B shape at batch 1 (4k and 32k tokens) and batch 8 (32k), a profile of
# `full` and `default` (prefill and decode steps) at 4k, and the 4k row with
# torch's own SDPA choice (cuDNN). Each step is time-boxed, so one failure leaves the others' output.
#
#   bench/gpu_suite.sh OUTDIR          # on a CUDA machine, from the repository root
#
# A machine without the package's dependencies installs wheels from .whl/ (no index, no deps) and
# the package itself (editable). A shorter run: REPEATS=2 REPEATS_B8=1 B8_CONFIGS="full default"
# NO_CUDNN_ROW=1. The lengths and the device can be changed to try the script on a CPU first:
# GPU_DEVICE=cpu GPU_SHAPE=tiny SHORT=256 LONG=512 NO_INSTALL=1 bench/gpu_suite.sh /tmp/g
set -u
out=${1:?usage: bench/gpu_suite.sh OUTDIR}
py=${PYTHON:-python3}
shape=${GPU_SHAPE:-llama3-8b}
device=${GPU_DEVICE:-cuda}
short=${SHORT:-4096}
long=${LONG:-32768}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# Files: setup.txt (install, machine, tests), one log per step, the tables' JSON, profile_ops.txt.
step() {  # step FILE SECONDS COMMAND...: output appended to OUTDIR/FILE.txt, its tail shown here
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $* (limit ${limit} s)" >>"$out/$name.txt"
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s" >>"$out/$name.txt"
    grep -v -e "^USDT:" -e " rep [0-9]" "$out/$name.txt" | tail -n 24
}

if [ -z "${NO_INSTALL:-}" ]; then
    step setup 60 bash -c "if ls .whl/*.whl >/dev/null 2>&1; then $py -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1; fi
        $py -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
        $py -c 'import kvcore.registry, kvcomp_plugins; print(\"kvcomp importable\")'"
fi
step setup 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    $py -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
    $py -c 'import triton; print(\"triton\", triton.__version__)'"

# The kernels first: timings of a kernel that fails its tests are moot.
if [ "$device" = cuda ]; then
    step setup 100 "$py" -m pytest -q -p no:cacheprovider -n 8 tests/plugins/test_quant_triton.py tests/kvcore/test_cuda.py
fi
# One layer's decode attention alone (packed tiers against SDPA over the dense cache): whether a
# slow decode step is the attention kernels' doing.
step attend "${LIMIT_ATTEND:-90}" "$py" bench/bench_attend.py --device "$device" --lengths "$short" "$long" --batch 1 8 \
    --json "$out/attend.json"
common=(bench/bench_decode.py --shape "$shape" --device "$device" --decode-tokens 16 --no-cudnn-attention)
step decode_b1 "${LIMIT_B1:-170}" "$py" "${common[@]}" --lengths "$short" "$long" --batch 1 --repeats "${REPEATS:-3}" \
    --configs transformers full default fast lossless8 --json "$out/decode_b1.json"
step decode_b8 "${LIMIT_B8:-180}" "$py" "${common[@]}" --lengths "$long" --batch 8 --repeats "${REPEATS_B8:-2}" \
    --configs ${B8_CONFIGS:-full default fast} --json "$out/decode_b8.json"
step profile 60 "$py" "${common[@]}" --lengths "$short" --batch 1 --repeats 1 --configs full default \
    --profile "$out/profile_ops.txt"
if [ -z "${NO_CUDNN_ROW:-}" ]; then
    step decode_cudnn 50 "$py" bench/bench_decode.py --shape "$shape" --device "$device" --decode-tokens 16 \
        --lengths "$short" --batch 1 --repeats 2 --configs transformers full default
fi
