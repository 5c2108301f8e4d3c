#!/usr/bin/env bash
# Nsight Compute on both sides of one side-by-side case, on identical inputs: our kernel through
# benchmarks/sbs_ours.py and upstream FlashMLA's through benchmarks/sbs_flashmla.py, each on the
# inputs side_by_side.py prepares, each in its own process, with the sections of device_check.sh's
# ncu stage (device_common.sh's NCU_ARGS and ncu_export) and the memory tables. (device_check.sh's
# ncu stage profiles benchmarks/profile_decode.py's inputs instead, which are not upstream's: its
# V3.2 pool fits in L2.) From the repo root:
#   run(command="SBS_CASES='sparse V3.2 b64 h128 topk2048 p64' bash scripts/ncu_side_by_side.sh; bash scripts/device_pack.sh",
#       carry=[".whl", ".anchor"])
# SBS_CASES: side_by_side.py --cases (comma-separated substrings; the FIRST case selected is the
# one profiled: launch 3 of the kernel, after its warm-up calls); SBS_SUITE (default sparse_decode);
# SIDES (default "ours upstream"; "upstream" alone needs no build); OURS_REGEX / UP_REGEX: kernel
# name regexes (default: our attention kernels / upstream's split-KV and prefill kernels);
# NCU_CLOCK: ncu's --clock-control (default base, ncu's own default: the SM clock locked at base;
# "none" leaves the boost clock, as the benchmarks run); NCU_EXTRA: more ncu arguments.
# Out ($OUT): ncu_<side>.txt, _details.txt, _raw.csv.gz, _sass.csv.gz (read like the ncu stage's).
set -uo pipefail
SIDES=${SIDES:-"ours upstream"}
STAGES=$([[ " $SIDES " == *" ours "* ]] && echo build || echo " ")
source scripts/device_common.sh   # OUT, REPO, log; builds ours when profiled
WORK=/tmp/ncu_sbs_work
mkdir -p /tmp/site && tar xzf "$REPO/.anchor/flashmla_site.tgz" -C /tmp/site || exit 1
log "inputs: ${SBS_CASES:?SBS_CASES: which side-by-side case}"
JAX_PLATFORMS=cpu PYTHONPATH="$REPO" python3 "$REPO/benchmarks/side_by_side.py" \
  --suite ${SBS_SUITE:-sparse_decode} --cases "$SBS_CASES" --work "$WORK" --keep-work \
  --prepare-only --out /tmp/ncu_sbs_prep 2>&1 | tail -2
for side in $SIDES; do
  if [ "$side" = ours ]; then
    regex=${OURS_REGEX:-"(dense_decode|sparse_attention).*kernel"}
    cmd=(python3 "$REPO/benchmarks/sbs_ours.py" --work "$WORK" --quick)
  else
    regex=${UP_REGEX:-"splitkv|sparse_attn_fwd"}  # decode (dense, sparse), prefill
    cmd=(env PYTHONPATH=/tmp/site python3 "$REPO/benchmarks/sbs_flashmla.py" --work "$WORK" --quick)
  fi
  log "ncu $side (kernel regex $regex, clock control ${NCU_CLOCK:-base})"
  timeout 300 ncu --kernel-name "regex:$regex" --launch-skip 2 --launch-count 1 \
    --clock-control ${NCU_CLOCK:-base} "${NCU_ARGS[@]}" --section MemoryWorkloadAnalysis_Tables \
    -o "/tmp/ncu_$side" -f "${cmd[@]}" > "$OUT/ncu_$side.log" 2>&1
  echo "ncu exit $?"; grep -v "^\[" "$OUT/ncu_$side.log" | tail -3
  ncu_export "$side" "/tmp/ncu_$side.ncu-rep"
  grep -E "Duration|Elapsed Cycles|SM Frequency|L1: Data Pipe Lsu|DRAM Throughput|L2 Hit Rate  " \
    "$OUT/ncu_${side}_details.txt" | head -8
done
rm -rf "$WORK"
log done
