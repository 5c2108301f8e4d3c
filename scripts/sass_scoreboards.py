"""Which loads a loop's waits wait for: the variable-latency scoreboards of one kernel's SASS.

Every SASS instruction of sm_70 and later carries control bits (Jia et al., "Dissecting the NVIDIA
Volta GPU Architecture via Microbenchmarking", 2018, section 2.3): from bit 105 of the 128-bit
word, 4 bits of stall cycles, a yield bit, a 3-bit write scoreboard (7 = none), a 3-bit read
scoreboard, a 6-bit wait mask and 4 reuse bits. A variable-latency instruction (LDG, LDS, ...)
names the scoreboard its result is counted on; a later instruction whose wait mask has that bit
waits until EVERY instruction counted on it has completed. So when ptxas puts the next tile's
row loads on the scoreboard of the rows being consumed now, the first use waits for both, and a
fetch "one tile ahead" hides nothing (docs/PERFORMANCE.md, 2026-12-03, third session, section 6).

  python scripts/sass_scoreboards.py x.cubin --function WsMathE4 [--loop-after ARRIVES.LDGSTSBAR]
  python scripts/sass_scoreboards.py dump.sass ...     (text of `cuobjdump -sass`)

Prints, for the loop (the first backward branch after the last instruction matching
--loop-after; or --range LO-HI, hex addresses): every global load with its write scoreboard,
every instruction waiting on a scoreboard such a load writes, and per scoreboard the loads and
the waits (a scoreboard may also count other variable-latency instructions: shared loads, barrier
try-waits; the listing names only the global loads). Needs cuobjdump for a cubin (PATH, or pip's nvidia-cuda-cuobjdump: --bin).

  python scripts/sass_scoreboards.py x.cubin --function WsMathE4 --role-loops [--min-loop 40]

instead lists each warpgroup role's loops: the code after each `USETMAXREG` (its register budget
names the role: e.g. kRolesWide 0xa0 values, 0xc8 scores, 0x90 producer) up to the next, and in
it every backward branch's body of --min-loop or more instructions, with its instruction count
and a few opcode counts (wgmma, global / shared loads and stores, conversions, fp16 math, MUFU).
Static counts: a body holds both sides of its runtime branches (e.g. the V4 producers' 8- and
16-byte load paths), and ptxas may move cold blocks behind the last role's code, so a large loop
there can be another role's (read its opcodes: wgmma and MUFU are math, LDG + STS producers).
What it is for: which role's per-tile work a change grew, and how the roles of two kernels
compare (ours, or upstream's prebuilt ones: docs/BUILDING.md), without a device
(docs/PERFORMANCE.md, 2026-12-07 tenth session).
"""
import argparse
import bisect
import os
import re
import subprocess
import sys

LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/")
WORD = re.compile(r"^\s*/\* (0x[0-9a-f]+) \*/")
GLOBAL_LOAD = re.compile(r"\b(LDG|LDGSTS)\b")


def decode(hi_word):
    """Control bits of an instruction from the upper 64 bits of its encoding."""
    c = hi_word >> 41
    return dict(stall=c & 15, yld=(c >> 4) & 1, wbar=(c >> 5) & 7, rbar=(c >> 8) & 7,
                wait=(c >> 11) & 63)


def parse(text):
    """[(function, [dict(addr, text, stall, wbar, rbar, wait)])] from `cuobjdump -sass` text."""
    funcs, cur, lines = [], None, text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = []
            funcs.append((m.group(1), cur))
            continue
        m = LINE.match(line)
        if m and cur is not None and i + 1 < len(lines):
            w = WORD.match(lines[i + 1])
            if w:
                ins = decode(int(w.group(1), 16))
                ins.update(addr=int(m.group(1), 16), text=m.group(2).strip())
                cur.append(ins)
    return funcs


def loop_range(ins, after):
    """The first backward branch after the last instruction matching `after`: (target, branch)."""
    marks = [x["addr"] for x in ins if re.search(after, x["text"])]
    if not marks:
        raise SystemExit(f"no instruction matches {after!r}")
    for x in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", x["text"])
        if x["addr"] > marks[-1] and m and int(m.group(1), 16) < x["addr"]:
            return int(m.group(1), 16), x["addr"]
    raise SystemExit(f"no backward branch after {after!r}")


def sb_name(b):
    return "-" if b == 7 else f"SB{b}"


def report(ins, lo, hi, out=None):
    out = out or sys.stdout
    body = [x for x in ins if lo <= x["addr"] <= hi]
    loads = [x for x in body if GLOBAL_LOAD.search(x["text"]) and x["wbar"] != 7]
    boards = sorted({x["wbar"] for x in loads})
    print(f"loop {lo:#x}-{hi:#x}: {len(body)} instructions, {len(loads)} global loads on a "
          f"scoreboard ({', '.join(sb_name(b) for b in boards) or 'none'})", file=out)
    waits = {b: [] for b in boards}
    for x in body:
        hit = [b for b in boards if x["wait"] >> b & 1]
        is_load = x in loads
        if is_load or hit:
            tag = f"writes {sb_name(x['wbar'])}" if is_load else "        "
            on = ",".join(sb_name(b) for b in hit)
            print(f"  {x['addr']:#7x}  {tag}  {'waits ' + on if on else '':<14} {x['text'][:72]}",
                  file=out)
        for b in hit:
            waits[b].append(x["addr"])
    for b in boards:
        n = sum(1 for x in loads if x["wbar"] == b)
        at = ", ".join(f"{a:#x}" for a in waits[b]) or "none inside the loop"
        print(f"{sb_name(b)}: {n} global loads; waited on at {at}", file=out)
    return loads, waits


ROLE_OPS = ("HGMMA", "LDG", "STG", "LDS", "STS", "F2FP", "HADD2", "HMUL2", "FMUL", "MUFU", "SHFL",
            "IMAD")


def role_loops(ins, min_loop=40, out=None):
    """Per warpgroup role (code between USETMAXREGs), the backward branches' bodies of at least
    min_loop instructions: [(budget, lo, hi, count, {opcode: count})]; printed."""
    out = out or sys.stdout
    addrs = [x["addr"] for x in ins]  # (ascending: the listing's order)
    starts = [(x["addr"], re.search(r"(0x[0-9a-f]+)\s*$", x["text"]).group(1))
              for x in ins if x["text"].startswith("USETMAXREG")]
    start_addrs = [a for a, _ in starts]

    def role(addr):  # the budget of the last USETMAXREG at or before addr
        k = bisect.bisect_right(start_addrs, addr)
        return starts[k - 1][1] if k else "entry"
    rows = []
    for i, x in enumerate(ins):
        m = re.search(r"\bBRA (?:\S+ )?(0x[0-9a-f]+)", x["text"])
        if not m:
            continue
        lo, here = int(m.group(1), 16), role(x["addr"])
        if lo >= x["addr"] or role(lo) != here:
            continue
        body = ins[bisect.bisect_left(addrs, lo):i + 1]
        if len(body) < min_loop:
            continue
        ops = {}
        for y in body:
            words = y["text"].split()
            op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        rows.append((here, lo, x["addr"], len(body), ops))
        counts = " ".join(f"{k} {ops.get(k, 0)}" for k in ROLE_OPS)
        print(f"  role {here:>6s}  loop {lo:#7x}-{x['addr']:#7x}  {len(body):5d} "
              f"instructions: {counts}", file=out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input", help="a cubin / .o (cuobjdump runs on it) or a `cuobjdump -sass` text")
    ap.add_argument("--function", default=None, help="substring of the kernel's mangled name")
    ap.add_argument("--loop-after", default=r"ARRIVES\.LDGSTSBAR",
                    help="regex: the loop is the first backward branch after its last match")
    ap.add_argument("--range", default=None, help="LO-HI, hex addresses, instead of --loop-after")
    ap.add_argument("--bin", default=None, help="folder holding cuobjdump")
    ap.add_argument("--role-loops", action="store_true",
                    help="list each warpgroup role's loops (code after each USETMAXREG) instead")
    ap.add_argument("--min-loop", type=int, default=40, help="--role-loops: smallest body listed")
    a = ap.parse_args(argv)
    if a.input.endswith((".cubin", ".o")):
        exe = os.path.join(a.bin, "cuobjdump") if a.bin else "cuobjdump"
        text = subprocess.run([exe, "-sass", a.input], check=True, capture_output=True,
                              text=True).stdout
    else:
        with open(a.input) as f:
            text = f.read()
    funcs = [(n, i) for n, i in parse(text) if a.function is None or a.function in n]
    if not funcs:
        raise SystemExit(f"no function matching {a.function!r}")
    for name, ins in funcs:
        print(name)
        if a.role_loops:
            role_loops(ins, a.min_loop)
            continue
        if a.range:
            lo, hi = (int(v, 16) for v in a.range.split("-"))
        else:
            lo, hi = loop_range(ins, a.loop_after)
        report(ins, lo, hi)


if __name__ == "__main__":
    main()
