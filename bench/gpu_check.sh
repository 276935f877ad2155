#!/usr/bin/env bash
# Everything a GPU session checks, batched into one command (device time is scarce):
# build, the Triton kernel tests compiled for the GPU (no interpreter), the test suite on a CUDA
# machine, the Triton-vs-torch decode benchmarks, end-to-end decode latency, and GPU encode time.
#
#   bash bench/gpu_check.sh OUTDIR [IMAGE]     # IMAGE: a Kodak PNG for the encode timings
#
# Each step has its own time limit and the script goes on after a failure; OUTDIR gets log.txt
# and the JSON results (few files: the device tool returns at most eight).
set -u
out=${1:?usage: gpu_check.sh OUTDIR [IMAGE]}
image=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log everything, print rc and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
    return $rc
}

# Python packages the machine lacks travel as wheels in .whl/ (README, "Triton GPU decoder").
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step info 60 bash -c 'nvidia-smi -L; nproc; python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
# The package, C++ core included (scikit-build-core, nanobind and cmake are installed there).
step build 240 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
    echo "build failed: pure-Python fallback" | tee -a "$log"
    ln -sfn ../kernels n2l/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}
# Most important first: the time limit of the whole command may cut the tail.
step triton_tests 240 env TRITON_INTERPRET=0 python3 -m pytest -q -ra tests/test_triton.py
step bench_triton 200 python3 bench/bench_triton.py --sweep --no-compile --out "$out/triton.json"
step bench_decode 120 python3 -m pytest -q bench/bench_decode.py --benchmark-enable \
    --benchmark-columns=min,median,max --benchmark-json="$out/decode.json"
if [ -n "$image" ]; then
    step encode_crop 150 python3 bench/psnr_vs_iterations.py "$image" --crop 256 --mode hybrid --quality 3 \
        --iterations 8000 --device cuda --out "$out/encode_crop.json"
    step encode_full 150 python3 bench/psnr_vs_iterations.py "$image" --crop 0 --mode hybrid --quality 3 \
        --iterations 8000 --device cuda --out "$out/encode_full.json"
fi
step suite 200 python3 -m pytest -q -ra --ignore=tests/test_triton.py
step bench_compile 150 python3 bench/bench_triton.py --sizes 768x512 --out "$out/triton_compile.json"
grep -E "^=== .*rc=|passed|failed|error" "$log" | tail -n 40
