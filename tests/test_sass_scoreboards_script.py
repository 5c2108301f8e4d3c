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


ROLE_ROWS = [
    (0x00, "USETMAXREG.DEALLOC.CTAPOOL 0xa0", ctrl()),
    (0x10, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", ctrl()),   # role 0xa0: 3-instruction loop
    (0x20, "MUFU.EX2 R3, R3", ctrl()),
    (0x30, "@P0 BRA 0x10", ctrl()),
    (0x40, "USETMAXREG.DEALLOC.CTAPOOL 0x90", ctrl()),
    (0x50, "LDG.E.64.CONSTANT R8, desc[UR36][R6.64]", ctrl(wbar=1)),  # role 0x90: 5 instructions
    (0x60, "F2FP.F16.E4M3.UNPACK_B R2, R8", ctrl(wait=1 << 1)),
    (0x70, "HMUL2.BF16_V2 R2, R2, R4", ctrl()),
    (0x80, "STS.128 [R3], R8", ctrl()),
    (0x90, "@!P1 BRA 0x50", ctrl()),
    (0xa0, "@P2 BRA 0x20", ctrl()),                                   # crosses roles: not a loop
    (0xb0, "EXIT", ctrl()),
]


def test_role_loops():
    (_, ins), = sb.parse(listing(ROLE_ROWS))
    buf = io.StringIO()
    rows = sb.role_loops(ins, min_loop=2, out=buf)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("0xa0", 0x10, 0x30, 3), ("0x90", 0x50, 0x90, 5)]
    assert rows[0][4]["HGMMA"] == 1 and rows[0][4]["MUFU"] == 1
    assert {k: rows[1][4].get(k, 0) for k in ("LDG", "F2FP", "HMUL2", "STS", "BRA")} == \
        {"LDG": 1, "F2FP": 1, "HMUL2": 1, "STS": 1, "BRA": 1}  # (the guard @!P1 is not the opcode)
    assert "role   0x90  loop    0x50-   0x90      5 instructions" in buf.getvalue()
    assert sb.role_loops(ins, min_loop=4, out=io.StringIO())[0][0] == "0x90"  # the 3-long one dropped
