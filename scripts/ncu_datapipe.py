"""The SM's L1 data pipe (LSU wavefronts: shared-memory and global / local / distributed-shared
traffic share it) of ncu profiles, per tile: which instructions fill it, side by side.

Each profile: the raw page (`ncu --import R --page raw --csv | gzip`) and the source page
(`--page source --csv --print-source sass | gzip`), as scripts/device_check.sh's ncu stage and
scripts/ncu_side_by_side.sh write them, with the number of 64 x 64 tiles the kernel ran (e.g.
sparse decode: b * ceil(s_q * h_q / 64) * topk / 64), so kernels of different grids compare per
tile. Collect MemoryWorkloadAnalysis_Tables for the shared / global split (NCU_EXTRA).

  python scripts/ncu_datapipe.py ours=ncu_ours_raw.csv.gz,ncu_ours_sass.csv.gz,8192 \\
      upstream=ncu_upstream_raw.csv.gz,ncu_upstream_sass.csv.gz,8192

Prints per profile: elapsed cycles, data-pipe wavefronts as % of peak (the whole kernel, ramp and
tail included), wavefronts per tile (shared, the rest = global / local / remote), bank conflicts,
global load sectors; then per opcode: warp instructions, shared wavefronts, L1 tag requests and L2
sectors (global) per tile. The rest (non-shared) has no per-instruction counter in the source
page: read it from the opcodes' tag requests and sectors.
"""
import collections
import csv
import gzip
import sys


def raw_metrics(path):
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    return dict(zip(rows[0], rows[-1]))


def num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return float("nan")


def per_opcode(path):
    """{opcode: [warp instructions, shared wavefronts, tag requests, L2 sectors]} summed over the
    kernel (opcode: mnemonic + .128 / .64 width; predicates dropped)."""
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    idx = {h: i for i, h in enumerate(rows[head])}
    cols = ["Instructions Executed", "L1 Wavefronts Shared", "L1 Tag Requests Global",
            "L2 Theoretical Sectors Global"]
    agg = collections.defaultdict(lambda: [0.0] * 4)
    for r in rows[head + 1:]:
        if len(r) < len(idx):
            continue
        words = r[idx["Source"]].split()
        if not words:
            continue
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        parts = op.split(".")
        key = parts[0] + "".join("." + p for p in parts[1:] if p in ("128", "64"))
        for k, c in enumerate(cols):
            v = num(r[idx[c]]) if c in idx else 0.0
            agg[key][k] += 0.0 if v != v else v
    return agg


def main(argv):
    profiles = []
    for arg in argv:
        label, spec = arg.split("=", 1)
        raw, sass, tiles = spec.split(",")
        profiles.append((label, raw_metrics(raw), per_opcode(sass), float(tiles)))
    print(f"{'':44s}" + "".join(f"{p[0]:>16s}" for p in profiles))

    def row(name, fn):
        print(f"{name:44s}" + "".join(f"{fn(m, t):16.1f}" for _, m, _, t in profiles))

    def cyc(m):
        return num(m.get("gpc__cycles_elapsed.max"))

    def total(m):  # the data pipe's peak: one wavefront per SM per cycle
        return pct(m) / 100 * cyc(m) * sms(m)

    def shared(m):
        return num(m.get("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"))

    def pct(m):
        return num(m.get("l1tex__data_pipe_lsu_wavefronts.sum.pct_of_peak_sustained_elapsed"))

    def sms(m):
        return num(m.get("device__attribute_multiprocessor_count", 132))

    row("elapsed cycles", lambda m, t: cyc(m))
    row("SM cycles per tile (cycles x SMs / tiles)", lambda m, t: cyc(m) * sms(m) / t)
    row("data pipe, % of peak", lambda m, t: pct(m))
    row("data-pipe wavefronts per tile", lambda m, t: total(m) / t)
    row("  shared", lambda m, t: shared(m) / t)
    row("  rest (global, local, remote)", lambda m, t: (total(m) - shared(m)) / t)
    row("shared bank conflicts per tile",
        lambda m, t: num(m.get("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum")) / t)
    row("global load sectors per tile (L1)",
        lambda m, t: num(m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum")) / t)
    row("L2 hit rate, %", lambda m, t: num(m.get("lts__t_sector_hit_rate.pct")))
    row("warp instructions per tile", lambda m, t: num(m.get("smsp__inst_executed.sum")) / t)
    ops = collections.Counter()
    for _, _, agg, t in profiles:
        for k, v in agg.items():
            ops[k] += (v[1] + v[2] + v[0] * 1e-3) / t
    print("\nper tile: warp instructions / shared wavefronts / L1 tag requests (global) / "
          "L2 sectors")
    for k, _ in ops.most_common():
        cells = []
        for _, _, agg, t in profiles:
            v = agg.get(k, [0.0] * 4)
            cells.append(f"{v[0] / t:7.1f}/{v[1] / t:6.0f}/{v[2] / t:5.0f}/{v[3] / t:5.0f}")
        if any(agg.get(k, [0] * 4)[1] + agg.get(k, [0] * 4)[2] > 0 for _, _, agg, _ in profiles) \
                or k in ("STAS.128", "STSM", "SYNCS", "BRA"):
            print(f"  {k:14s}" + "".join(f"{c:>30s}" for c in cells))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
