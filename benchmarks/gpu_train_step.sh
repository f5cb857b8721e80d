#!/usr/bin/env bash
# Training step time on a GPU: ResNet-18 and ResNet-50 at 224x224, float vs F8Net fixed
# point, under each precision setting, at the largest batch that fits.
#
#   bash benchmarks/gpu_train_step.sh [OUT_DIR]      (default benchmarks/results/gpu)
#
# Needs jax with CUDA, flax, optax, orbax, clu and ml_collections; no TensorFlow. For each
# model the batch starts at START_BATCH (default 1024 for ResNet-18, 512 for ResNet-50) and
# halves until the fixed-point step (the larger one) compiles and runs at float32; that
# batch then serves every mode and precision, so the ratios compare like with like. Each
# run is benchmarks/train_step.py (float and fixed point alternating in one process,
# median of STEPS steps); its full output and a JSON file land in OUT_DIR, and the last
# lines of this script are one `f8/fp step time ratio` per model and precision.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
steps=${STEPS:-10}
mkdir -p "$out"
python - <<'EOF'
import jax
print("devices:", jax.devices())
assert jax.default_backend() == "gpu", "this script measures a GPU"
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

summary=()
for model in resnet18 resnet50; do
  if [ "$model" = resnet18 ]; then batch=${START_BATCH:-1024}; else batch=${START_BATCH:-512}; fi
  for precision in float32 bfloat16; do
    while :; do
      log="$out/${model}_b${batch}_${precision}.txt"
      if python benchmarks/train_step.py --model="$model" --batch="$batch" --image_size=224 \
          --num_classes=1000 --steps="$steps" --precision="$precision" \
          --json="$out/${model}_b${batch}_${precision}.json" >"$log" 2>&1; then
        break
      fi
      if [ "$precision" = float32 ] && grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$log" \
          && [ "$batch" -gt 8 ]; then
        echo "$model batch $batch does not fit; trying $((batch / 2))"
        rm -f "$log"
        batch=$((batch / 2))
        continue
      fi
      echo "$model b$batch $precision failed:"; tail -5 "$log"; exit 1
    done
    tail -4 "$log"
    summary+=("$model 224 b$batch $precision: $(tail -1 "$log")")
  done
done
printf '%s\n' "${summary[@]}"
