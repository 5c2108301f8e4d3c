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
