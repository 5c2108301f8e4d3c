#!/usr/bin/env bash
# The device tool brings back at most 8 files from $OUT (docs/BUILDING.md); the stages write more.
# End a device command with this: everything under $OUT becomes $OUT/all.tgz (files matching
# PACK_EXCLUDE, default '*trace*', are left out: profiler traces are large). Unpack here with
#   mkdir -p x && tar xzf /work/.device/<n>/all.tgz -C x
set -uo pipefail
OUT=${OUT:-/tmp/jfm-out}
cd "$OUT" || exit 1
tar czf /tmp/jfm_pack.tgz --exclude="${PACK_EXCLUDE:-*trace*}" . && rm -rf "${OUT:?}"/* \
  && mv /tmp/jfm_pack.tgz "$OUT/all.tgz" && ls -la "$OUT"
