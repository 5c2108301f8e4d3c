"""scripts/ncu_datapipe.py, the per-tile L1 data-pipe accounting of ncu profiles: its numbers from
synthetic raw and source pages in the layout ncu's CSV export writes (the raw page: a header row,
a units row, one row per kernel; the source page: the kernel's name, then a header row and one row
per SASS instruction)."""
import csv
import gzip
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))

import ncu_datapipe  # noqa: E402

RAW = {
    "gpc__cycles_elapsed.max": "1000",
    "device__attribute_multiprocessor_count": "2",
    "l1tex__data_pipe_lsu_wavefronts.sum.pct_of_peak_sustained_elapsed": "50",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum": "600",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum": "20",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum": "1,000",  # ncu's thousands separators
    "lts__t_sector_hit_rate.pct": "90",
    "smsp__inst_executed.sum": "5000",
}
SOURCE_COLS = ["Address", "Source", "Instructions Executed", "L1 Wavefronts Shared",
               "L1 Tag Requests Global", "L2 Theoretical Sectors Global"]
SOURCE_ROWS = [
    ["0x10", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ", "40", "400", "0", "0"],
    ["0x20", "@P0 LDG.E.EL.LTC256B.128.CONSTANT R8, desc[UR36][R2.64]", "20", "0", "220", "400"],
    ["0x30", "STS.128 [R119], R80", "30", "120", "0", "0"],
    ["0x40", "@!P1 STS.128 [R115+0x2000], R84", "10", "40", "0", "0"],
    ["0x50", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR33+0x38280], R2", "80", "0", "0", "0"],
]


def write_profile(tmp_path):
    raw, src = tmp_path / "raw.csv.gz", tmp_path / "sass.csv.gz"
    with gzip.open(raw, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(RAW))
        w.writerow(["" for _ in RAW])  # units
        w.writerow(list(RAW.values()))
    with gzip.open(src, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void k<1>(P)"])
        w.writerow(SOURCE_COLS)
        w.writerows(SOURCE_ROWS)
    return raw, src


def test_per_opcode_sums_widths_and_drops_predicates(tmp_path):
    _, src = write_profile(tmp_path)
    agg = ncu_datapipe.per_opcode(src)
    assert agg["STS.128"] == [40.0, 160.0, 0.0, 0.0]  # both stores, with and without a predicate
    assert agg["LDG.128"] == [20.0, 0.0, 220.0, 400.0]
    assert agg["HGMMA"] == [40.0, 400.0, 0.0, 0.0]
    assert agg["SYNCS"][0] == 80.0


def test_per_tile_table(tmp_path, capsys):
    raw, src = write_profile(tmp_path)
    ncu_datapipe.main([f"a={raw},{src},10", f"b={raw},{src},20"])
    out = capsys.readouterr().out
    rows = {line[:44].strip(): line[44:].split() for line in out.splitlines() if line[:44].strip()}
    # 50% of (1000 cycles x 2 SMs) = 1000 wavefronts: 100 per tile over 10 tiles, 50 over 20.
    assert rows["data-pipe wavefronts per tile"] == ["100.0", "50.0"]
    assert rows["shared"] == ["60.0", "30.0"]
    assert rows["rest (global, local, remote)"] == ["40.0", "20.0"]
    assert rows["SM cycles per tile (cycles x SMs / tiles)"] == ["200.0", "100.0"]
    assert rows["global load sectors per tile (L1)"] == ["100.0", "50.0"]
    sts = next(line for line in out.splitlines() if line.strip().startswith("STS.128"))
    assert "4.0/    16/    0/    0" in sts and "2.0/     8/    0/    0" in sts
