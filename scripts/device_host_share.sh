#!/usr/bin/env bash
# The host's share of a decode step under XLA's command buffers, one device call: builds the
# package, then (1) benchmarks/jax_dispatch_gap.py --ours under the default XLA flags and each of
# HOST_VARIANTS ("name=XLA flags" entries, ';'-separated; each in its own process), and (2) the
# 61-layer loop of benchmarks/bench_decode.py at LOOP_CASES (step time against the GPU's busy time
# per step) under the default flags and each variant, ROUNDS times (default 3) in alternation
# (default, variant, default, variant, ...): one run per side misled once (a single captured run at
# 1.39x the GPU's busy time that three alternating runs did not reproduce; PERFORMANCE.md, fourth
# 2026-12-06 session).
#   run(command="bash scripts/device_host_share.sh; bash scripts/device_pack.sh", carry=[".whl"])
# Outputs in $OUT: build.log, dispatch_gap.txt, loop_<name>_<round>.{json,log}, loop.txt.
# SKIP_GAP=1: the loop alone. HOST_VARIANTS="": the default flags only.
set -uo pipefail
STAGES=${STAGES:-"build"}
source scripts/device_common.sh
rc=0
VARIANTS=${HOST_VARIANTS-"nocc=--xla_gpu_enable_command_buffer=-CUSTOM_CALL;cache64=--xla_cmd_buffer_trace_cache_size=64"}
CASES=${LOOP_CASES:-"64x4096,2x4096"}

if [ "${SKIP_GAP:-0}" != 1 ]; then
  log "dispatch gap: ours and x + 1, default flags and: $VARIANTS"
  timeout -k 5 ${GAP_TIMEOUT:-240} python3 "$REPO/benchmarks/jax_dispatch_gap.py" --ours --mib 4 \
    --xla-variants "$VARIANTS" > "$OUT/dispatch_gap.txt" 2>&1 || { echo "dispatch gap failed"; rc=1; }
  grep -E "^==|ours|x \+ 1" "$OUT/dispatch_gap.txt" | head -60
fi

log "layer loop at $CASES, default flags and each variant, ${ROUNDS:-3} rounds"
IFS=';' read -ra cfgs <<< "default=;$VARIANTS"
for round in $(seq ${ROUNDS:-3}); do
  for cfg in "${cfgs[@]}"; do
    name=${cfg%%=*}; flags=$(echo ${XLA_FLAGS:-} ${cfg#*=})  # (no stray blanks: XLA_FLAGS=" " failed)
    echo "== $name round $round: XLA_FLAGS=$flags" | tee -a "$OUT/loop.txt"
    ( if [ -n "$flags" ]; then export XLA_FLAGS="$flags"; else unset XLA_FLAGS; fi
      timeout -k 5 ${LOOP_TIMEOUT:-150} python3 "$REPO/benchmarks/bench_decode.py" --loop-only \
        --loop-cases "$CASES" --layers ${LAYERS:-61} --out "$OUT/loop_${name}_$round.json" ) \
      > "$OUT/loop_${name}_$round.log" 2>&1 || { echo "loop $name failed"; tail -5 "$OUT/loop_${name}_$round.log"; rc=1; }
    grep -E "layer step" "$OUT/loop_${name}_$round.log" | tee -a "$OUT/loop.txt"
  done
done
log "done (rc $rc)"
exit $rc
