#!/usr/bin/env bash
# The GPU checks of issue #19, as one script for a lent GPU machine (about 5 minutes, at most 9): the CUDA
# graph tests (graph against eager), benchmark.py for the four paper settings (eager and graph side by side),
# a 2,000-iteration 5w1s run through the graph path, and a short eager run to compare the training rate.
#
#   bash gpu_check.sh        # in the repository root; the Omniglot zips in shared-data/ (git-ignored)
#
# Everything it reports goes to $OUT (default gpu-check/), at most 8 files: check.log (all output), and the
# run's summary.json, log.csv and curves.png, and the eager run's summary.json. Each step has its own time
# limit and a failing step does not stop the others; check.log ends with one line per step and its exit code.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/check.log") 2>&1

results=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember its exit code
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    results+=("$name: exit $code after $((SECONDS - started)) s")
}

echo "=== environment"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN',
torch.backends.cudnn.version(), torch.cuda.get_device_name(), 'TF32 cudnn', torch.backends.cudnn.allow_tf32,
'TF32 matmul', torch.backends.cuda.matmul.allow_tf32)"

mkdir -p data && cp shared-data/*.zip data/
step "data" 120 python3 preprocess_omniglot.py
step "tests" 150 python3 -m pytest tests/test_cuda_graph.py tests/test_maml.py -q -rs
for setting in 5w1s 5w5s 20w1s 20w5s; do
    step "benchmark $setting" 75 python3 benchmark.py --protocol paper --device cuda --setting "$setting" --repeats 20
done

run=runs/gpu-check-5w1s
rm -rf "$run" runs/gpu-check-eager
# SIGINT at the limit: the run checkpoints and writes an "in progress" summary.json, which is still reported.
step "train 5w1s, 2000 iterations, graph" 180 \
    timeout -s INT 170 python3 maml_omniglot.py --setting 5w1s --iterations 2000 --out "$run"
cp "$run/summary.json" "$run/log.csv" "$OUT/" 2>/dev/null
cp "$run/curves.png" "$OUT/" 2>/dev/null
python3 - "$run/log.csv" <<'EOF'
# The validation curve (accuracy after 3 inner steps, 320 tasks: about 1 point of standard error) against the
# committed CPU run's at the same iterations.
import csv, os, sys
def val(path):
    return {int(r["iteration"]): float(r["acc_step3"]) for r in csv.DictReader(open(path)) if r["split"] == "val"}
if os.path.exists(sys.argv[1]):
    gpu, cpu = val(sys.argv[1]), val("results/5w1s/log.csv")
    for i in sorted(gpu.keys() & cpu.keys()):
        print(f"iteration {i:5d}: val acc after 3 steps, GPU graph {100 * gpu[i]:.1f} %, committed CPU run "
              f"{100 * cpu[i]:.1f} %, difference {100 * (gpu[i] - cpu[i]):+.1f} points")
EOF
step "train 5w1s, 300 iterations, eager" 90 \
    timeout -s INT 80 python3 maml_omniglot.py --setting 5w1s --iterations 300 --eval-every 300 --test-tasks 32 \
    --no-cuda-graph --out runs/gpu-check-eager
cp runs/gpu-check-eager/summary.json "$OUT/eager-summary.json" 2>/dev/null
python3 - "$run/summary.json" runs/gpu-check-eager/summary.json <<'EOF'
import json, sys
for path in sys.argv[1:]:
    try:
        s = json.load(open(path))
    except OSError:
        continue
    print(f"{path}: {s['status']}, iteration {s['iteration']}, {s['meta_iterations_per_s']} meta-iterations/s "
          f"(sampling included), test {s['test']}, "
          f"computation {s['segments'][-1]['computation']}, device {s['device']}")
EOF

echo "=== steps"
printf '%s\n' "${results[@]}"
