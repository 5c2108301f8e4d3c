#!/usr/bin/env bash
# The device tool brings back at most 8 files from $OUT (docs/BUILDING.md); the stages write more.
# End a device command with this: everything under $OUT becomes $OUT/all.tgz (files matching
# PACK_EXCLUDE, default the profiler's '*perfetto_trace.json.gz' and '*.xplane.pb', are left out:
# they are large; the tile-phase probe's tile_trace*.txt come back). Unpack here with
#   mkdir -p x && tar xzf /work/.device/<n>/all.tgz -C x
set -uo pipefail
OUT=${OUT:-/tmp/jfm-out}
cd "$OUT" || exit 1
excl=()
set -f  # the patterns go to tar as they are, not globbed here
for pat in ${PACK_EXCLUDE:-*perfetto_trace.json.gz *.xplane.pb}; do excl+=(--exclude="$pat"); done
set +f
tar czf /tmp/jfm_pack.tgz "${excl[@]}" . && rm -rf "${OUT:?}"/* \
  && mv /tmp/jfm_pack.tgz "$OUT/all.tgz" && ls -la "$OUT"
