"""scripts/tile_trace.py, the JFM_TILE_TRACE probe's reader (csrc/kernels/sm90/decode/tile_trace.cuh):
its phases from a synthetic trace whose clocks wrap the 32-bit counter, and the two-buffer identity
it prints as a check."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))

import tile_trace  # noqa: E402

PERIOD, S, SOFTMAX, PV_SC, PV_VAL, HAND, LATE, GAP, ISSUE = 3900, 1500, 500, 1500, 1300, 100, 900, 40, 300
FENCE = 250  # of LATE: the proxy fence after the barrier waits (slot 10, sc_waited)


def synthetic(path, ctas=2, tiles=10, slots=11):
    """A steady pipeline: tile t's scores full wait ends at f = base + t PERIOD; the producer's empty
    wait of tile t ends GAP after tile t - 2's release (the later P V end)."""
    lines = ["# kernel sparse_attention_ws_kernel WsMath 1 call 3; cta tile then slots 0-9"]
    for c in range(ctas):
        base = (1 << 32) - 20000 + 17 * c  # wraps within the first tiles
        for t in range(tiles):
            f = base + t * PERIOD
            pub = f + S + SOFTMAX
            release = max(pub + PV_SC, pub + HAND + PV_VAL)
            prod_empty = release - 2 * PERIOD + GAP  # tile t - 2's release, in tile t's frame
            vals = [prod_empty, prod_empty + ISSUE, f, f + S, pub, pub + PV_SC, f + 10, pub + HAND,
                    pub + HAND + PV_VAL, f - LATE, f - FENCE][:slots]
            lines.append(" ".join(str(x) for x in [c, t] + [v % (1 << 32) for v in vals]))
    path.write_text("\n".join(lines) + "\n")


def test_phases_and_identity(tmp_path):
    p = tmp_path / "trace.txt"
    synthetic(p)
    (run,) = tile_trace.read(str(p))
    rows = run["rows"]
    assert len(rows) == 20
    got = tile_trace.phases(rows[(1, 3)], rows[(1, 4)], rows[(1, 5)])
    release = S + SOFTMAX + max(PV_SC, HAND + PV_VAL)
    assert got["period"] == PERIOD and got["late"] == LATE and got["S"] == S
    assert got["softmax+P"] == SOFTMAX and got["P hand-off"] == HAND
    assert got["PV scores"] == PV_SC and got["PV values"] == PV_VAL
    assert got["release"] == release and got["gap"] == GAP
    assert got["fill"] == 2 * PERIOD - release - GAP and got["2 periods - sum"] == 0
    assert got["issue"] == ISSUE
    assert got["wait"] == LATE - FENCE and got["fence"] == FENCE


def test_traces_without_the_fence_stamp(tmp_path):
    # Probe builds before slot 10 (sc_waited) wrote 10 slots: no wait / fence split, the rest alike.
    p = tmp_path / "trace10.txt"
    synthetic(p, slots=10)
    (run,) = tile_trace.read(str(p))
    got = tile_trace.phases(run["rows"][(0, 3)], run["rows"][(0, 4)], run["rows"][(0, 5)])
    assert "wait" not in got and "fence" not in got
    assert got["late"] == LATE and got["2 periods - sum"] == 0


def test_summary_prints_every_phase(tmp_path, capsys, monkeypatch):
    p = tmp_path / "trace.txt"
    synthetic(p)
    monkeypatch.setattr(sys, "argv", ["tile_trace.py", str(p)])
    tile_trace.main()
    out = capsys.readouterr().out
    assert "(12 tiles)" in out  # tiles 2 .. 7 of each CTA have both successors
    for name in ("period", "late", "wait", "fence", "fill", "issue", "gap", "2 periods - sum"):
        assert name in out


def test_cta_records_with_start_and_end_stamps(tmp_path, capsys, monkeypatch):
    # "@" lines (cta_trace, cta_stamp): a stamping CTA with its tiles, then the 8 end stamps and the
    # 7 start-up stamps (CtaStampSlot 8-14), all on its clock; the start-up ones print in the order
    # they came, as cycles from entry, the end ones from the last P V.
    p = tmp_path / "trace.txt"
    synthetic(p, ctas=1, tiles=10)
    lines = p.read_text().splitlines()
    first = [int(x) for x in lines[1].split()]
    last = [int(x) for x in lines[-1].split()]
    entry_clk = (first[2 + 2] - 9000) % (1 << 32)  # tile 0's scores full wait, 9000 after entry
    last_pv = max(last[2 + 5], last[2 + 8])
    exit_clk = (last_pv + 4800) % (1 << 32)
    ends = [last_pv + x for x in (5, 3300, 4600, 250, 3200, 4610, -3400, 4550)]
    starts = {8: 2000, 9: 2050, 10: 2100, 11: 6000, 12: 2500, 13: 1500, 14: 1900}
    stamps = [v % (1 << 32) for v in ends] + [(entry_clk + starts[s]) % (1 << 32) for s in range(8, 15)]
    ns0 = 10**9
    lines.append(" ".join(str(x) for x in ["@", 0, 0, 0, ns0, ns0 + 20000, entry_clk, exit_clk] + stamps))
    lines.append(" ".join(str(x) for x in ["@", 9, 5, 0, ns0 + 50, ns0 + 19000, 7, 8] + [0] * 15))
    p.write_text("\n".join(lines) + "\n")
    (run,) = tile_trace.read(str(p))
    assert run["starts"][(0, 0)]["tile 0 indices"] == stamps[11]
    assert run["ends"][(0, 0)]["producer left"] == stamps[7]
    monkeypatch.setattr(sys, "argv", ["tile_trace.py", str(p)])
    tile_trace.main()
    out = capsys.readouterr().out
    assert ("before the first tile: producer at the set-up barrier 1500, producer past it 1900, "
            "producer set up 2000, schedule row 2050, first live tile 2100, Q loaded 2500, "
            "tile 0 indices 6000") in out
    assert "after the last P V: scores stats 5, scores stored 3300" in out
    assert "exit 4800" in out
    # The last sequence's output stores per math warpgroup (stats -> stored): 3300 - 5, 3200 - 250.
    assert "last sequence's output stores (stats -> stored): scores 3295, values 2950 cycles" in out


def test_transposed_phases(tmp_path):
    # kTransposed16 / 32 (WsMath 2 / 3): one math warpgroup stamps the scores' slots, two
    # producers fill alternate tiles (tile t + 2 is the same buffer's), and V3.2's fill stamps
    # its rows' arrival (slot 15). Tile t: full wait ends at f = base + t PERIOD; the producer's
    # empty wait of t + 2 ends GAP after t's P V.
    period, late, s, mask, exch, pst, fence, resc, pv, gap, rows, issue = (
        4000, 300, 1000, 200, 900, 400, 250, 150, 800, 90, 25, 3000)
    pub_full = 2 * period - (s + mask + exch + pst + fence + resc + pv) - gap - issue
    lines = ["# kernel sparse_attention_ws_kernel WsMath 3 call 3; cta tile then slots 0-15"]
    base = (1 << 32) - 9000  # wraps
    for t in range(8):
        f = base + t * period
        sc_s, sc_mask = f + s, f + s + mask
        sc_pfree = sc_mask + exch
        sc_pst = sc_pfree + pst
        sc_pub = sc_pst + fence
        sc_soft = sc_pub + resc
        sc_pv = sc_soft + pv
        prod_empty = sc_pv - 2 * period + gap  # tile t - 2's release, in tile t's frame
        vals = [prod_empty, prod_empty + issue, f, sc_s, sc_pub, sc_pv, 0, 0, 0, f - late, 0,
                sc_mask, sc_soft, sc_pfree, sc_pst, prod_empty + rows]
        lines.append(" ".join(str(x) for x in [0, t] + [v % (1 << 32) for v in vals]))
    p = tmp_path / "trace_t.txt"
    p.write_text("\n".join(lines) + "\n")
    (run,) = tile_trace.read(str(p))
    got = tile_trace.phases_t(run["rows"][(0, 3)], run["rows"][(0, 4)], run["rows"][(0, 5)])
    assert got["period"] == period and got["late"] == late and got["S"] == s
    assert got["mask"] == mask and got["max exchange"] == exch and got["P stores"] == pst
    assert got["fence+barrier"] == fence and got["rescale"] == resc and got["PV"] == pv
    assert got["math busy"] == s + mask + exch + pst + fence + resc + pv
    assert got["period"] == got["math busy"] + got["P V -> next wait"] + late
    assert got["gap"] == gap and got["rows after empty"] == rows and got["issue"] == issue
    assert got["published -> full"] == pub_full and got["2 periods - sum"] == 0
    assert "  warps' skew" not in got  # a 16-slot trace: no per-warp stamps
    # With the producer warps' own stamps (slots 16-18), the hand-over taken apart.
    nn = dict(run["rows"][(0, 5)])
    w = [nn["prod_issued"] + x for x in (40, 700, 300)]
    nn.update(prod_issued_w1=w[0] % (1 << 32), prod_issued_w2=w[1] % (1 << 32),
              prod_issued_w3=w[2] % (1 << 32))
    got = tile_trace.phases_t(run["rows"][(0, 3)], run["rows"][(0, 4)], nn)
    assert got["  last warp published"] == issue + 700 and got["  warps' skew"] == 700
    assert got["  last published -> full"] == pub_full - 700
    # Under the lazy max (no exchange stamp) the exchange and the P stores are one phase.
    r = dict(run["rows"][(0, 3)], sc_pfree=0)
    got = tile_trace.phases_t(r, run["rows"][(0, 4)], run["rows"][(0, 5)])
    assert "max exchange" not in got and got["lazy max + P stores"] == exch + pst


def test_register_p_traces(tmp_path):
    # Register P (JFM_WS_SCORES_REG_P, split or not) stamps no publication (slot 4 stays 0): the
    # scores chain reads S -> mask -> softmax -> P free wait -> the last P stores, and the first
    # P's hand-off runs from the P free wait to the values' p_ready wait.
    MASK, SOFT, PFREE, PST, HANDOFF, PV_AFTER = 120, 330, 230, 420, 285, 210
    lines = ["# kernel dense_decode_ws_kernel WsMath 5 call 3; cta tile then slots 0-22"]
    base = (1 << 32) - 9000  # wraps within the first tiles
    for t in range(8):
        f = base + t * PERIOD
        s = f + S
        mask, soft = s + MASK, s + MASK + SOFT
        pfree = soft + PFREE
        pst = pfree + PST
        val_p = pfree + HANDOFF
        sc_pv, val_pv = pst + PV_AFTER, val_p + PV_VAL
        prod_empty = max(sc_pv, val_pv) - 2 * PERIOD + GAP
        slots = [prod_empty, prod_empty + ISSUE, f, s, 0, sc_pv, f + 10, val_p, val_pv, f - LATE,
                 f - FENCE, mask, soft, pfree, pst] + [0] * 8
        lines.append(" ".join(str(x) for x in [0, t] + [v % (1 << 32) for v in slots]))
    p = tmp_path / "regp.txt"
    p.write_text("\n".join(lines) + "\n")
    (run,) = tile_trace.read(str(p))
    rows = run["rows"]
    got = tile_trace.phases(rows[(0, 3)], rows[(0, 4)], rows[(0, 5)])
    assert got["softmax+P"] == MASK + SOFT + PFREE + PST
    assert got["  mask"] == MASK and got["  softmax"] == SOFT
    assert got["  rescale+PV issue+P free"] == PFREE and got["  P stores"] == PST
    assert got["first P -> values"] == HANDOFF and got["PV scores (after P)"] == PV_AFTER
    assert got["PV values"] == PV_VAL and "P hand-off" not in got
    assert got["release"] == S + MASK + SOFT + PFREE + HANDOFF + PV_VAL
    assert got["2 periods - sum"] == 0
