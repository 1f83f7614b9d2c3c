#!/usr/bin/env bash
# The GPU path, checked once on a machine with an NVIDIA GPU (PyPI reachable, no model hub needed):
# installs a CUDA torch and vLLM, then runs a small generate on vLLM and on the transformers backend
# with device=cuda, a short `sift train` in bf16 and `sift eval`, printing each step's time and
# tokens/s. Under 10 minutes on one GPU. It cannot run on the CPU machines sift is developed on.
#
#     bash bench/gpu_check.sh            # from the repo root; artifacts in runs/gpucheck-*/
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

make setup TORCH_SPEC=torch                      # CUDA torch, the project, the embedded model
.venv/bin/pip install -q -e '.[vllm]'
SIFT=.venv/bin/sift
PY=.venv/bin/python
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

# the seconds and output tokens of a stage, from its stats file
rate() { $PY - "$1" "$2" <<'EOF'
import json, sys
stats = json.load(open(sys.argv[1]))
secs, toks = stats.get("wall_time_s") or stats.get("teacher_seconds"), stats.get("tokens_out", 0)
print(f"{sys.argv[2]}: {secs:.1f} s, {toks} tokens out, {toks / secs:.0f} tokens/s")
EOF
}
timed() { local label=$1; shift; local t0=$SECONDS; "$@"; echo "$label: $((SECONDS - t0)) s"; }

for backend in vllm transformers; do
  run=gpucheck-$backend
  rm -rf "runs/$run"
  $SIFT seeds seeds/default.jsonl --run "$run" >/dev/null
  opts=()
  [ "$backend" = transformers ] && opts=(--teacher.options device=cuda)
  [ "$backend" = vllm ] && opts=(--teacher.options gpu_memory_utilization=0.5,max_model_len=4096)
  $SIFT generate --run "$run" --teacher.backend "$backend" "${opts[@]}" --generate.n 200 --generate.max_tokens 256
  rate "runs/$run/generate.stats.json" "generate on $backend"
done

# the student side on the transformers run's data: classify, instances, filter, export, train, eval
run=gpucheck-transformers
timed classify  $SIFT classify  --run $run --teacher.options device=cuda
timed instances $SIFT instances --run $run --teacher.options device=cuda --instances.max_tokens 200
$SIFT filter --run $run && $SIFT export --run $run
timed train $SIFT train --run $run --train.precision bf16 --train.epochs 1
$PY -c "import json; m=[json.loads(l) for l in open('runs/$run/student/metrics.jsonl')]; \
s=[x for x in m if 'train_tokens_per_second' in x or 'tokens_per_second' in x]; print('train:', s[-1] if s else m[-1])"
timed eval $SIFT eval --run $run --student.device cuda --eval.sets valid,general --eval.limit 64 --eval.max_new_tokens 128
$PY -c "import json; e=json.load(open('runs/$run/eval.json')); print('eval sets:', sorted(e))"
echo "gpu_check: done"
