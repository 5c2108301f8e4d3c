#!/usr/bin/env bash
# The multi-process check (docs/SHARDING.md, "Several processes (hosts)"), one device call:
# install (building the CUDA extension against the device's jaxlib), then run
# examples/multihost_decode.py as 2 processes joined by jax.distributed, one per GPU
# (CUDA_VISIBLE_DEVICES), with the kernels, for the data-parallel (local and replicated pool) and
# head-parallel layouts; then the CPU multi-process test (2 and 4 processes, fake CPU devices) on
# the device's jax. Exits non-zero if any process or stage fails. Logs go to $OUT. From the repo
# root:
#   run(command="bash scripts/device_multihost.sh", carry=[".whl"], kind="nvidia-h200-x2")
# Stages can be chosen: STAGES="build gpu cpu" (default: all). GPU_ARGS adds example flags.
set -uo pipefail
STAGES=${STAGES:-"build gpu cpu"}
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on this machine, in every process
source scripts/device_common.sh
rc=0

if has gpu; then
  n_proc=2
  port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
  log "examples/multihost_decode.py: $n_proc processes, one GPU each, coordinator 127.0.0.1:$port"
  pids=()
  for ((i = 0; i < n_proc; i++)); do
    CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$port \
      timeout 240 python3 "$REPO/examples/multihost_decode.py" \
        --coordinator 127.0.0.1:$port --num-processes $n_proc --process-id $i \
        --implementation kernel --layout data --layout data-replicated --layout heads \
        --batch 64 --heads 128 --seqlen 2048 --iters 50 ${GPU_ARGS:-} \
        > "$OUT/multihost_gpu_p$i.log" 2>&1 &
    pids+=($!)
  done
  # Wait for each; the first failure stops the others (they would wait for it until the timeout).
  for _ in "${pids[@]}"; do
    wait -n; r=$?
    if [ "$r" -ne 0 ] && [ "$rc" -eq 0 ]; then
      rc=1; echo "a process exited $r: stopping the others"
      kill -TERM "${pids[@]}" 2>/dev/null
    fi
  done
  for ((i = 0; i < n_proc; i++)); do
    echo "--- process $i ($OUT/multihost_gpu_p$i.log)"
    grep -E "^\[process|Error|error:" "$OUT/multihost_gpu_p$i.log" | tail -12
    grep -q "^\[process $i/$n_proc\] passed" "$OUT/multihost_gpu_p$i.log" \
      || { rc=1; echo "process $i did not pass"; tail -25 "$OUT/multihost_gpu_p$i.log"; }
  done
fi
if has cpu; then
  log "CPU multi-process test (2 and 4 processes, fake CPU devices) on this jax"
  timeout 240 python3 -m pytest -q -p no:cacheprovider --durations=3 \
    "$REPO/tests/test_multihost.py" 2>&1 | tee "$OUT/multihost_cpu.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
log "done (rc $rc)"
exit $rc
