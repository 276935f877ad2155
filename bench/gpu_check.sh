#!/usr/bin/env bash
# Everything a GPU session checks, batched into one command (device time is scarce):
# the Triton kernel tests compiled for the GPU (no interpreter), the Triton-vs-torch decode
# benchmarks, end-to-end decode latency, and GPU encode time.
#
#   bash bench/gpu_check.sh OUTDIR [IMAGE]     # IMAGE: a Kodak PNG for the encode timing
#
# Triton compiles each kernel variant on the CPU in 5-60 s, one at a time per process, so the
# first phase runs the tests and one untimed pass of every benchmark in parallel processes
# (they fill Triton's on-disk cache); the timed benchmarks then run alone, one after another.
# Each step has its own time limit and the script goes on after a failure; OUTDIR gets log.txt,
# the per-process logs and the JSON results. Without the C++ core (not built here: the GPU
# checks don't need it) its benchmark rows are skipped.
set -u
out=${1:?usage: gpu_check.sh OUTDIR [IMAGE]}
image=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
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
fi
# The package from the source tree, as the pure-Python install maps it (kernels/ -> n2l.kernels).
ln -sfn ../kernels n2l/kernels
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
step info 60 bash -c 'nvidia-smi -L; nproc; python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"'

# Phase 1, parallel: the kernel tests in 6 groups, and one untimed run of each benchmark.
t0=$SECONDS
python3 -m pytest -q --collect-only tests/test_triton.py 2>/dev/null | grep '::' >"$out/nodes.txt"
pids=()
for g in 0 1 2 3 4 5; do
    awk -v g=$g 'NR % 6 == g' "$out/nodes.txt" >"$out/group$g.txt"
    timeout 270 python3 -m pytest -q -ra $(cat "$out/group$g.txt") >"$out/tests$g.log" 2>&1 &
    pids+=($!)
done
for p in fast default best; do
    timeout 270 python3 -m pytest -q bench/bench_triton.py -k "triton and $p" --benchmark-disable \
        >"$out/warm_$p.log" 2>&1 &
    pids+=($!)
done
timeout 270 python3 -m pytest -q bench/bench_decode.py -k cuda --benchmark-disable >"$out/warm_decode.log" 2>&1 &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
echo "=== phase 1 (tests + compile) in $((SECONDS - t0)) s" | tee -a "$log"
tail -n 3 "$out"/tests*.log "$out"/warm_*.log | tee -a "$log"

# Phase 2, alone on the GPU: the timed benchmarks.
step bench_triton 120 python3 bench/bench_triton.py --no-compile --out "$out/triton.json"
step bench_decode 80 python3 -m pytest -q bench/bench_decode.py -k cuda --benchmark-enable \
    --benchmark-columns=min,median,max --benchmark-json="$out/decode.json"
if [ -n "$image" ]; then
    step encode_full 150 python3 bench/psnr_vs_iterations.py "$image" --crop 0 --mode hybrid --quality 3 \
        --iterations 2000 16000 --device cuda --out "$out/encode_full.json"
fi
grep -E "^=== .*rc=|passed|failed|error" "$log" | tail -n 40
