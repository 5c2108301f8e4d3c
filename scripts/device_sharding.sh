#!/usr/bin/env bash
# The 2-GPU sharding check (docs/SHARDING.md), one device call: install (building the CUDA
# extension against the device's jaxlib), run the sharding tests on 2 GPUs with the kernels, time a
# batch split over 2 GPUs against one GPU holding half the batch, run the sharded example, and the
# CPU sharding suite on the device's jax. Logs go to $OUT. From the repo root:
#   run(command="bash scripts/device_sharding.sh", carry=[".whl"], kind="nvidia-h200-x2")
# Stages can be chosen: STAGES="build gpu time example cpu" (default: all).
set -uo pipefail
STAGES=${STAGES:-"build gpu time example cpu"}
source scripts/device_common.sh
rc=0

if has gpu; then
  log "sharding tests on 2 GPUs"
  timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rs -m gpu \
    "$REPO/tests/gpu/test_sharding_gpu.py" 2>&1 | tee "$OUT/sharding_gpu.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if has time; then
  log "per-step time: batch (or heads) split over 2 GPUs vs one GPU with half the work"
  timeout 240 python3 "$REPO/tests/gpu/test_sharding_gpu.py" --time ${TIME_ARGS:-} 2>&1 \
    | tee "$OUT/sharding_time.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if has example; then
  log "examples/sharded_attention.py on 2 GPUs (data 2 x model 1, then data 1 x model 2)"
  for mesh in "--data 2 --model 1" "--data 1 --model 2"; do
    timeout 120 python3 "$REPO/examples/sharded_attention.py" $mesh 2>&1 \
      | tee -a "$OUT/sharded_example.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
fi
if has cpu; then
  log "CPU sharding suite (8 fake devices) on this jax"
  timeout 300 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_sharding.py" 2>&1 \
    | tee "$OUT/sharding_cpu.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
log "done (rc $rc)"
exit $rc
