"""Summarizes a JFM_TILE_TRACE file (csrc/kernels/sm90/decode/tile_trace.cuh): per traced kernel,
medians (and p10 / p90) over its traced tiles (CTAs 0-3; tiles 2 .. the CTA's last but two, past
the ramp) of the phases of one 64-token tile of the role split, in SM cycles (offsets from the
scores warpgroup's full wait's end of tile k unless said):

  period       tile k -> k + 1, the scores' full wait ends
  late         how long the scores waited at the full barrier (wait end - arrival): > 0 when
               the tile's fill, not the math, decided when S could start; with 11 slots split
               into "wait" (the barrier waits) and "fence" (the proxy fence after them)
  S            S complete
  softmax+P    S complete -> P and the corrections published; with 15 slots taken apart into
               mask, softmax, the wait for the values warpgroup to free the last P, the P
               stores (issue only) and the proxy fence + p_ready arrival (the stores draining)
               (register P, no publication stamp: S -> the last P stores; phases() says how
               its parts and the hand-off read there)
  P hand-off   published -> the values warpgroup received them
  PV scores    published -> the scores' P V half complete (its barrier, rescale, wgmma)
  PV values    received -> the values' P V half complete
  release      the later of the two P V ends: the buffer's last reader
  gap          release -> the producer's empty wait for tile k + 2 (same buffer) ends: ~the
               mbarrier's latency when the producer was waiting for it (buffer reuse gates the
               fill), more when the producer came late
  fill         the producer's empty wait end of tile k + 2 -> the scores' full wait end of k + 2
  issue        of that fill: the producer's empty wait end -> its copies issued (the rest of the
               fill is the copies landing)
The two-buffer identity: 2 periods = release + gap + fill (checked: "2 periods - sum").

Then the role split's sequence boundaries (slots 19-22, stamped at a sequence's first tile:
sparse prefill's and sparse decode's query tokens, dense's sequences; the FP8 role splits since
2026-12-07): the previous sequence's last P V -> this tile's S taken apart per role (row totals,
output stores issued, Q landed, full wait).

Then, from the same build, every CTA's entry and exit on the GPU's global timer (cta_trace; the
sparse and dense warp-specialized kernels): launch skew, the CTAs' durations and how far apart
they finish (the kernel's tail), with the tile-stamping CTAs (blockIdx.x < 4, a few percent
slower) listed apart.

  python3 scripts/tile_trace.py /tmp/jfm_tile_trace.txt
Run the probe: build with CUDAFLAGS=-DJFM_TILE_TRACE=1 (device_check.sh's build stage), then any
call of a role-split kernel (benchmarks/profile_decode.py ...) with JFM_TILE_TRACE_FILE set; the
third launch of each kernel object is written (JFM_TILE_TRACE_CALL). The producer stamps are in
the bf16 fills (dense, sparse prefill, bf16 sparse decode) and in the FP8 role split's pipelined
fill (kRolesWide: the V3.2 default above 32 heads, V4 where the pair does not pay) and in the CTA
pairs' fill (kRolesPair; "issue" there includes the rows landing, fetched before the empty wait,
and the peer's st.async copies issued, not landed) and the transposed kernels' FP8 fills
(kTransposed16 / 32, summarized by phases_t, whose docstring has their phases; V3.2's add "rows
after empty"); kRolesWide's unpipelined FP8 fill does not stamp (fill and gap: n/a).
"""
import collections
import statistics
import sys

SLOTS = ("prod_empty", "prod_issued", "sc_full", "sc_s", "sc_pub", "sc_pv", "val_full", "val_p",
         "val_pv", "sc_wait", "sc_waited", "sc_mask", "sc_soft", "sc_pfree", "sc_pst", "prod_rows",
         "prod_issued_w1", "prod_issued_w2", "prod_issued_w3", "bd_sc_stats", "bd_sc_stored",
         "bd_sc_q", "bd_val_stored")
# (traces before sc_waited have 10 slots, before sc_mask 11, before prod_rows 15, before the
# producer warps' own publication stamps 16)
TRANSPOSED = ("WsMath 2", "WsMath 3")  # kTransposed16 / 32: one math warpgroup, phases_t


kTraceCtas, kTraceTiles = 4, 64  # tile_trace.cuh: the tile-stamping CTAs, tiles stamped per CTA
Cta = collections.namedtuple("Cta", "cta bx by entry exit entry_clk exit_clk")  # "@" lines
END_SLOTS = ("scores stats", "scores stored", "scores left", "values stats", "values stored",
             "values left", "producer done", "producer left")  # CtaStampSlot 0-7
# (the transposed kernels, WsMath 2-3: "scores stored" is the math warpgroup's end, outputs stored,
# "scores left" past the copy of its stamps to the trace buffer (one thread, ~10k cycles: probe
# cost); "producer done" / "producer left" producer warpgroup 1's / 2's end)
START_SLOTS = ("producer set up", "schedule row", "first live tile", "tile 0 indices",
               "Q loaded", "producer at the set-up barrier",
               "producer past it")  # CtaStampSlot 8-14 (older traces: fewer or none)


def read(path):
    runs, cur = [], None
    for line in open(path):
        if line.startswith("#"):
            cur = {"head": line[1:].strip(), "rows": {}, "ctas": []}
            runs.append(cur)
        elif line.startswith("@") and cur is not None:
            # "@ cta bx by entry_ns exit_ns entry_clk exit_clk stamp_0 .. stamp_14" (cta_trace,
            # cta_stamp)
            v = [int(x) for x in line[1:].split()]
            cur["ctas"].append(Cta(*v[:7]))
            cur.setdefault("ends", {})[(v[1], v[2])] = dict(zip(END_SLOTS, v[7:15]))
            cur.setdefault("starts", {})[(v[1], v[2])] = dict(zip(START_SLOTS, v[15:22]))
        elif line.strip() and cur is not None:
            v = [int(x) for x in line.split()]
            cur["rows"][(v[0], v[1])] = dict(zip(SLOTS, v[2:]))
    return runs


def d(a, b):
    """b - a in cycles on the 32-bit counter (wraps)."""
    return (b - a + (1 << 31)) % (1 << 32) - (1 << 31)


def phases(r, nxt, nn):
    o = {s: d(r["sc_full"], v) for s, v in r.items()}  # offsets from tile k's full wait end
    release = max(o["sc_pv"], o["val_pv"])
    out = {
        "period": d(r["sc_full"], nxt["sc_full"]),
        "late": d(r["sc_wait"], r["sc_full"]),
        **({"wait": d(r["sc_wait"], r["sc_waited"]), "fence": d(r["sc_waited"], r["sc_full"])}
           if "sc_waited" in r else {}),
        "S": o["sc_s"],
    }
    if r.get("sc_pub"):  # P from shared memory: published, then the scores' own P V
        out.update({
            "softmax+P": o["sc_pub"] - o["sc_s"],
            **({"  mask": o["sc_mask"] - o["sc_s"], "  softmax": o["sc_soft"] - o["sc_mask"],
                "  P free wait": o["sc_pfree"] - o["sc_soft"],
                "  P stores": o["sc_pst"] - o["sc_pfree"], "  fence+arrive": o["sc_pub"] - o["sc_pst"]}
               if r.get("sc_pst") else {}),
            "P hand-off": o["val_p"] - o["sc_pub"],
            "PV scores": o["sc_pv"] - o["sc_pub"],
        })
    else:  # register P (JFM_WS_SCORES_REG_P; no publication stamp): the scores' P V issued
        # before P is stored. Whole tile: softmax = every exponential; rescale+PV issue+P free =
        # O's rescale, the P V issue, the wait for the values to free the last P; P stores = its
        # stores. In halves (JFM_WS_SPLIT_P): softmax = the row max + the first half's
        # exponentials; then the first half's P V issue and the P free wait; "P stores" = the first
        # half's stores, publication, the second half's exponentials, P V issue and stores.
        # "first P -> values" runs from the P free wait's end to the values' p_ready wait's end
        # (the first (half's) stores, fence, arrival and hand-off).
        out.update({
            "softmax+P": o["sc_pst"] - o["sc_s"],
            "  mask": o["sc_mask"] - o["sc_s"], "  softmax": o["sc_soft"] - o["sc_mask"],
            "  rescale+PV issue+P free": o["sc_pfree"] - o["sc_soft"],
            "  P stores": o["sc_pst"] - o["sc_pfree"],
            "first P -> values": o["val_p"] - o["sc_pfree"],
            "PV scores (after P)": o["sc_pv"] - o["sc_pst"],
        })
    out.update({"PV values": o["val_pv"] - o["val_p"], "release": release})
    if nn["prod_empty"]:
        out["gap"] = d(r["sc_full"], nn["prod_empty"]) - release
        out["fill"] = d(nn["prod_empty"], nn["sc_full"])
        out["issue"] = d(nn["prod_empty"], nn["prod_issued"])
        out["2 periods - sum"] = (d(r["sc_full"], nn["sc_full"]) - release - out["gap"]
                                  - out["fill"])
    return out


def phases_t(r, nxt, nn):
    """kTransposed16 / 32 (one math warpgroup; two producers fill alternate tiles, so tile k + 2
    is the same producer's and buffer's): the math's chain from its full wait's end (S, mask, the
    column-max exchange where it ran: kTrScPfree's slot, P^T stored, the proxy fence + warpgroup
    barrier, O^T's rescale, P V) and the fill of tile k + 2 (the producer's empty wait end -> its
    rows there -> published -> the math's full wait end; "published -> full" also holds the
    producer warpgroup's other warps and its RoPE copies landing: the stamp is its first
    thread's; traces with slots 16-18 split it into the last warp's publication, the warps'
    skew and the rest). "P V -> next wait" (tile k's P V stamp -> tile k + 1's wait stamp, so
    period = math busy + it + next late) spans ~25 integer instructions of the loop: what it
    shows above ~50 cycles is the stamps' own cost (each an STG queued behind the producers'
    loads; docs/BUILDING.md, 2026-12-04 sixth session), which the math's other phases carry too.
    Traces from builds after that session stamp the math into shared memory (tile_trace_smem)."""
    o = {s: d(r["sc_full"], v) for s, v in r.items()}
    out = {"period": d(r["sc_full"], nxt["sc_full"]), "late": d(r["sc_wait"], r["sc_full"]),
           "S": o["sc_s"], "mask": o["sc_mask"] - o["sc_s"]}
    if r["sc_pfree"]:  # the exchange ran (not the lazy max)
        out["max exchange"] = o["sc_pfree"] - o["sc_mask"]
        out["P stores"] = o["sc_pst"] - o["sc_pfree"]
    else:
        out["lazy max + P stores"] = o["sc_pst"] - o["sc_mask"]
    out.update({"fence+barrier": o["sc_pub"] - o["sc_pst"], "rescale": o["sc_soft"] - o["sc_pub"],
                "PV": o["sc_pv"] - o["sc_soft"], "math busy": o["sc_pv"],
                "P V -> next wait": d(r["sc_pv"], nxt["sc_wait"])})
    if nn["prod_empty"]:
        out["gap"] = d(r["sc_pv"], nn["prod_empty"])
        if nn.get("prod_rows"):
            out["rows after empty"] = d(nn["prod_empty"], nn["prod_rows"])
        out["issue"] = d(nn["prod_empty"], nn["prod_issued"])
        out["published -> full"] = d(nn["prod_issued"], nn["sc_full"])
        out["2 periods - sum"] = (d(r["sc_full"], nn["sc_full"]) - o["sc_pv"] - out["gap"]
                                  - out["issue"] - out["published -> full"])
        warps = [nn.get(f"prod_issued_w{w}", 0) for w in (1, 2, 3)]
        if all(warps):  # each producer warp's publication: the hand-over taken apart
            pub = [d(nn["prod_empty"], v) for v in [nn["prod_issued"]] + warps]
            out["  last warp published"] = max(pub)
            out["  warps' skew"] = max(pub) - min(pub)
            out["  last published -> full"] = d(nn["prod_empty"], nn["sc_full"]) - max(pub)
    return out


def summarize(run):
    rows = run["rows"]
    acc = {}
    split = phases_t if any(t in run["head"] for t in TRANSPOSED) else phases
    for (c, t), r in sorted(rows.items()):
        nxt, nn = rows.get((c, t + 1)), rows.get((c, t + 2))
        if t < 2 or nxt is None or nn is None:
            continue
        for k, v in split(r, nxt, nn).items():
            acc.setdefault(k, []).append(v)
    print(run["head"], f"({len(acc.get('period', []))} tiles)")
    print_medians(acc, "  ", 20)


def print_medians(acc, indent, width):
    """One line per phase: median, p10 and p90 of its cycles."""
    for k, v in acc.items():
        q = sorted(v)
        print(f"{indent}{k:{width}s} median {statistics.median(v):8.0f}  p10 {q[len(q) // 10]:8.0f}"
              f"  p90 {q[9 * len(q) // 10]:8.0f}")


def summarize_boundaries(run):
    """The role split's sequence boundaries (slots 19-22, stamped at a sequence's first tile):
    the previous sequence's last P V -> this tile's S, taken apart, per role, in cycles."""
    rows, acc = run["rows"], {}
    for (c, t), r in sorted(rows.items()):
        prev = rows.get((c, t - 1))
        if not r.get("bd_sc_stats") or prev is None:
            continue
        ph = {"period into this tile": d(prev["sc_full"], r["sc_full"]),
              "scores: last P V -> stats": d(prev["sc_pv"], r["bd_sc_stats"]),
              "scores: stats -> stored": d(r["bd_sc_stats"], r["bd_sc_stored"])}
        if r.get("bd_sc_q"):
            ph["scores: stored -> Q landed"] = d(r["bd_sc_stored"], r["bd_sc_q"])
            ph["scores: Q landed -> full wait"] = d(r["bd_sc_q"], r["sc_wait"])
        else:
            ph["scores: stored -> full wait"] = d(r["bd_sc_stored"], r["sc_wait"])
        ph["scores: full wait -> full"] = d(r["sc_wait"], r["sc_full"])
        if r.get("bd_val_stored"):
            ph["values: last P V -> stored"] = d(prev["val_pv"], r["bd_val_stored"])
            ph["values: stored -> full"] = d(r["bd_val_stored"], r["val_full"])
        ph["this tile's fill issued -> scores full"] = d(r["prod_issued"], r["sc_full"])
        for k, v in ph.items():
            acc.setdefault(k, []).append(v)
    if not acc:
        return
    n = len(next(iter(acc.values())))
    print(f"  sequence boundaries ({n}; the previous sequence's last tile -> this one's first)")
    print_medians(acc, "    ", 38)


def summarize_ctas(run):
    """Every CTA's entry and exit (global timer, ns) against the first entry: launch skew, the
    CTAs' own durations, and how the last exits spread (the kernel's tail). The CTAs that stamp
    tiles (blockIdx.x < kTraceCtas) and their cluster peers run a few percent slower (the stamps' stores):
    they are shown apart and left out of the rest."""
    every = [r for r in run.get("ctas", []) if r.entry and r.exit]
    if not every:
        return
    t0 = min(r.entry for r in every)
    stamping = [r for r in every if r.bx < kTraceCtas]
    ctas = [r for r in every if r.bx >= kTraceCtas] or every
    entry = sorted((r.entry - t0) / 1e3 for r in ctas)
    exit_ = sorted((r.exit - t0) / 1e3 for r in ctas)
    dur = sorted((r.exit - r.entry) / 1e3 for r in ctas)

    def q(v):
        return (f"min {v[0]:7.2f}  p10 {v[len(v) // 10]:7.2f}  median {statistics.median(v):7.2f}"
                f"  p90 {v[9 * len(v) // 10]:7.2f}  max {v[-1]:7.2f}")
    print(f"  CTAs: {len(ctas)} (not the tile-stamping ones), us from the first entry (global timer)")
    print(f"    entry        {q(entry)}")
    print(f"    exit         {q(exit_)}")
    print(f"    duration     {q(dur)}")
    slow = sorted(ctas, key=lambda r: r.exit)[-4:]
    print("    last exits   " + ", ".join(f"cta ({r.bx}, {r.by}): {(r.exit - t0) / 1e3:.2f} (entry {(r.entry - t0) / 1e3:.2f})"
                                        for r in slow))
    if stamping:
        print("    tile-stamping CTAs' exits " + ", ".join(
            f"({r.bx}, {r.by}) {(r.exit - t0) / 1e3:.2f}" for r in sorted(stamping, key=lambda r: (r.bx, r.by))))
    # The stamping CTAs' time outside their tiles, in their own SM cycles: entry -> the producer's
    # first empty wait and -> the first full tile; the last P V -> exit. And the SM clock.
    rows = run["rows"]
    for _, bx, by, e, x, ec, xc in sorted(stamping, key=lambda r: (r.bx, r.by)):
        if by != 0 or (bx, 0) not in rows:
            continue
        ts = sorted(t for c, t in rows if c == bx)
        first, last = rows[(bx, ts[0])], rows[(bx, ts[-1])]
        # (the transposed kernels have no values warpgroup: val_pv 0, never stamped)
        end = max(d(first["sc_full"], v) for v in (last["sc_pv"], last["val_pv"]) if v)
        ghz = d(ec, xc) / max(x - e, 1)
        print(f"    cta ({bx}, 0): {ghz:.3f} GHz; entry -> producer's first empty wait "
              f"{d(ec, first['prod_empty']) if first['prod_empty'] else 'n/a'}, -> first full "
              f"{d(ec, first['sc_full'])}; last P V -> exit {d(first['sc_full'], xc) - end} cycles"
              f" ({len(ts)} tiles stamped{', more ran' if len(ts) == kTraceTiles else ''})")
        starts = run.get("starts", {}).get((bx, by), {})
        if any(starts.values()):  # from entry, in cycles, in the order they came
            taken = sorted(((d(ec, v), name) for name, v in starts.items() if v))
            print("      before the first tile: " + ", ".join(f"{name} {c}" for c, name in taken))
        ends = run.get("ends", {}).get((bx, by), {})
        stores = [(role, d(ends[f"{role} stats"], ends[f"{role} stored"])) for role in
                  ("scores", "values") if ends.get(f"{role} stats") and ends.get(f"{role} stored")]
        if stores:  # the CTA's last sequence: row totals handed over -> its output rows stored
            print("      last sequence's output stores (stats -> stored): " + ", ".join(
                f"{role} {c}" for role, c in stores) + " cycles")
        if ends and len(ts) < kTraceTiles:  # from the last P V, in cycles
            last_pv = d(ec, first["sc_full"]) + end  # from entry
            print("      after the last P V: " + ", ".join(
                f"{name} {d(ec, v) - last_pv}" for name, v in ends.items() if v)
                  + f", exit {d(ec, xc) - last_pv}")


def main():
    for run in read(sys.argv[1] if len(sys.argv) > 1 else "/tmp/jfm_tile_trace.txt"):
        summarize(run)
        summarize_boundaries(run)
        summarize_ctas(run)


if __name__ == "__main__":
    main()
