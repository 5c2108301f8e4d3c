"""Compare kernel variants of ours against FlashMLA, from side_by_side.py runs of one device call.

scripts/device_bench.sh runs side_by_side.py once as usual (ours + FlashMLA) and, for each
variant in VARIANTS, once more with ours only under that variant's switch (for example
JFM_KERNEL_VARIANT=v1), each on the same inputs. This prints, per case, ours (default), each
variant, FlashMLA, and each variant's ratio to FlashMLA and to the default, with geomeans.

  python benchmarks/sbs_variants.py OUT/side_by_side.json v1=OUT/v1/side_by_side.json
"""
import json
import math
import sys


def times(path):
    with open(path) as f:
        doc = json.load(f)
    got = {}
    for r in doc["rows"]:
        name = r["case"]["name"]
        got[name] = dict(suite=r["case"]["suite"],
                         ours=(r["ours"].get("perf") or {}).get("time_us"),
                         path=r["ours"].get("path"),
                         flashmla=(r["flashmla"].get("perf") or {}).get("time_us"))
    return got


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def main(argv):
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit(__doc__)
    base = times(argv[0])
    variants = [(a.split("=", 1)[0], times(a.split("=", 1)[1])) for a in argv[1:]]
    head = f"{'case':<44} {'ours us':>9} {'FlashMLA':>9}"
    for v, _ in variants:
        head += f" | {v + ' us':>9} {v + '/FM':>7} {v + '/ours':>8} {'path':>7}"
    print(head)
    ratios = {v: ([], []) for v, _ in variants}
    for name, b in base.items():
        line = f"{name:<44} {b['ours'] or 0:>9.1f} {b['flashmla'] or 0:>9.1f}"
        for v, rows in variants:
            t = rows.get(name, {}).get("ours")
            vs_fm = b["flashmla"] / t if t and b["flashmla"] else None
            vs_ours = b["ours"] / t if t and b["ours"] else None
            ratios[v][0].append(vs_fm)
            ratios[v][1].append(vs_ours)
            line += (f" | {t or 0:>9.1f} {vs_fm or 0:>7.2f} {vs_ours or 0:>8.2f} "
                     f"{rows.get(name, {}).get('path') or '-':>7}")
        print(line)
    for v, (fm, ours) in ratios.items():
        g_fm, g_ours = geomean(fm), geomean(ours)
        print(f"-- {v}: geomean speed vs FlashMLA "
              + (f"{g_fm:.3f}" if g_fm else "n/a") + ", vs ours default "
              + (f"{g_ours:.3f}" if g_ours else "n/a"))


if __name__ == "__main__":
    main(sys.argv[1:])
