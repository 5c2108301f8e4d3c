"""scripts/sass_scoreboards.py on a small hand-made `cuobjdump -sass` text (CPU only)."""
import importlib.util
import io
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "sass_scoreboards.py"
spec = importlib.util.spec_from_file_location("sass_scoreboards", SCRIPT)
sb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)


def ctrl(stall=1, wbar=7, rbar=7, wait=0):
    """The upper 64-bit word carrying these control bits (bit 105 of the instruction = bit 41)."""
    return (stall | (wbar << 5) | (rbar << 8) | (wait << 11)) << 41


def listing(rows):
    out = ["        Function : kern_WsMathE4", ""]
    for addr, text, hi in rows:
        out.append(f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000000000 */")
        out.append(f"                                                 /* {hi:#018x} */")
    return "\n".join(out) + "\n"


ROWS = [
    (0x00, "MOV R1, c[0x0][0x28]", ctrl()),
    (0x10, "F2FP.F16.E4M3.UNPACK_B R2, R76", ctrl(wait=1 << 5)),     # loop top: waits SB5
    (0x20, "LDG.E.128.CONSTANT R76, desc[UR36][R6.64]", ctrl(wbar=5)),
    (0x30, "LDG.E.128.CONSTANT R80, desc[UR36][R8.64]", ctrl(wbar=4)),
    (0x40, "LDS R9, [R3]", ctrl(wbar=2)),
    (0x50, "FADD R10, R9, R9", ctrl(wait=1 << 2)),                  # waits on the LDS only
    (0x60, "ARRIVES.LDGSTSBAR.64.ARVCNT [UR20+0x38280]", ctrl()),
    (0x70, "IMAD.MOV.U32 R116, RZ, RZ, R80", ctrl(wait=(1 << 4) | (1 << 5))),
    (0x80, "@!P0 BRA 0x10", ctrl()),
    (0x90, "EXIT", ctrl()),
]


def test_decode_round_trips_the_fields():
    c = sb.decode(ctrl(stall=10, wbar=3, rbar=1, wait=0b100101))
    assert (c["stall"], c["wbar"], c["rbar"], c["wait"]) == (10, 3, 1, 0b100101)
    assert sb.decode(ctrl())["wbar"] == 7  # no scoreboard


def test_loop_and_waits():
    (name, ins), = sb.parse(listing(ROWS))
    assert name == "kern_WsMathE4" and len(ins) == len(ROWS)
    lo, hi = sb.loop_range(ins, r"ARRIVES\.LDGSTSBAR")
    assert (lo, hi) == (0x10, 0x80)
    buf = io.StringIO()
    loads, waits = sb.report(ins, lo, hi, out=buf)
    assert [x["addr"] for x in loads] == [0x20, 0x30]
    # SB4 and SB5 each hold one load; the back edge's copy waits for both, the top for SB5 only;
    # the LDS's scoreboard (SB2) is not a global load's and is not listed.
    assert waits == {4: [0x70], 5: [0x10, 0x70]}
    text = buf.getvalue()
    assert "SB5: 1 global loads; waited on at 0x10, 0x70" in text
    assert "0x50" not in text


def test_main_reads_a_text_dump(tmp_path, capsys):
    f = tmp_path / "k.sass"
    f.write_text(listing(ROWS))
    sb.main([str(f), "--function", "WsMathE4"])
    assert "loop 0x10-0x80: 8 instructions, 2 global loads" in capsys.readouterr().out
