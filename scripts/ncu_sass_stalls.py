"""Where the warps of one kernel wait, per SASS instruction, from Nsight Compute's source page.

scripts/device_check.sh (stage ncu) writes ncu_<case>_sass.csv.gz with
  ncu --import rep.ncu-rep --page source --csv --print-source sass
This prints the total warp-stall samples, the instructions with the most samples (with their
stall-reason columns where the export has them) and the samples summed per opcode, so the stalls of
the producer warps (LDG, STS, mbarrier try-wait loops) can be told from the math warps' (HGMMA,
BAR, shuffles) in the warp-specialized kernels, whose WarpStateStats section averages over both.

  python scripts/ncu_sass_stalls.py ncu_sparse_v32_h128_sass.csv.gz [--top 25]

The column names of ncu's CSV differ between versions; the script looks for them by substring
and prints the header it found when it cannot.
"""
import argparse
import collections
import csv
import gzip
import io
import sys


def open_text(path):
    raw = gzip.open(path, "rb").read() if path.endswith(".gz") else open(path, "rb").read()
    return io.StringIO(raw.decode("utf-8", "replace"))


def find(header, *needles, exclude=()):
    for name in header:
        low = name.lower()
        if all(n in low for n in needles) and not any(x in low for x in exclude):
            return name
    return None


def number(text):
    try:
        return float(str(text).replace(",", "").strip() or 0)
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    lines = open_text(args.csv).read().splitlines()
    # ncu may print lines before the table (the kernel name); the header is the first line that
    # names the SASS source column.
    start = next((i for i, l in enumerate(lines) if "Source" in l and "," in l), None)
    if start is None:
        sys.exit(f"no source table in {args.csv} ({len(lines)} lines)")
    rows = list(csv.DictReader(lines[start:]))
    header = list(rows[0].keys()) if rows else []
    src = find(header, "source")
    addr = find(header, "address")
    samples = find(header, "warp stall sampling", "all") or find(header, "sampling", "all")
    not_issued = find(header, "warp stall sampling", "not")
    if src is None or samples is None:
        sys.exit("columns not found; header: " + " | ".join(header))
    reasons = [h for h in header if h.lower().startswith("stall") or "stall_" in h.lower()]
    total = sum(number(r[samples]) for r in rows)
    print(f"{len(rows)} SASS instructions, {total:.0f} warp-stall samples "
          f"(column '{samples}'{', not issued: ' + repr(not_issued) if not_issued else ''})")
    if total == 0:
        return
    by_op = collections.Counter()
    for r in rows:
        op = r[src].strip().split()
        # Skip a predicate (@P0 / @!P1) to get the opcode.
        op = [t for t in op if not t.startswith("@")]
        by_op[op[0].split(".")[0] if op else "?"] += number(r[samples])
    print("samples per opcode:")
    for op, n in by_op.most_common(15):
        print(f"  {op:14s} {n:9.0f}  {100 * n / total:5.1f}%")
    print(f"top {args.top} instructions:")
    top = sorted(rows, key=lambda r: -number(r[samples]))[: args.top]
    for r in top:
        n = number(r[samples])
        why = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:3]
        why = ", ".join(f"{c} {v:.0f}" for v, c in why if v > 0)
        where = r.get(addr, "") if addr else ""
        print(f"  {n:8.0f} {100 * n / total:5.1f}%  {where:>8}  {r[src].strip()[:60]:60s}  {why}")


if __name__ == "__main__":
    main()
