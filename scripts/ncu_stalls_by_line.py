"""Warp-stall samples of a warp-specialized kernel per CUDA source line and per warp role.

Input: an ncu source-page export (`--page source --csv --print-source sass`, see
scripts/ncu_sass_stalls.py) and the cubin or .o the kernel came from, built with CMakeLists.txt's
flags (-lineinfo among them). `nvdisasm -c -gi` gives every instruction's inlined call chain; the
SASS is checked against the export (count; per offset = address - first address: opcode, operands
modulo .reuse / labels / order). "Warp Stall Sampling (All Samples)" and the stall_* reasons are
summed per role, from ws_run's frame (ws_pipeline.cuh) in the chain: its producer call (warpgroup
2), ws_math<.., WsRole::kScores> (warpgroup 0), ws_math<.., WsRole::kValues> (warpgroup 1), each
with its setmaxnreg line (the transposed kernels: ws_math_t, "math", warpgroup 0, and the
producer call of warpgroups 1-2); "common": ws_setup, the task's constructor, ws_run's own lines (the
pair's closing cluster_sync). Instructions without a ws_run frame inside the ws_run call, and runs
of <= 2 instructions whose role differs from the agreeing roles around them (ptxas merges a few
identical instructions of the two ws_math copies), take the neighbours' role (printed: how many).
Then per role-level line (the line of ws_math / produce), per (role-level, innermost) line with the
BAR / try-wait just before its hottest instruction (a warp blocked on BAR.SYNC.DEFER_BLOCKING shows
on a later instruction), and every mbarrier try-wait's executions (first try: once per tile and
warp; retry loop: retries, and exits = the tiles whose first try failed).

  python scripts/ncu_stalls_by_line.py ncu_sass.csv.gz instantiate_ws_fp8_v32.o [--top 15]
Needs nvdisasm (and cuobjdump for a .o) on PATH or in --bin (pip: nvidia-cuda-nvdisasm).
"""
import argparse
import collections
import csv
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_sass_stalls import find, number, open_text  # noqa: E402

ROLES = ("producer", "scores", "values", "math", "common", "unknown")
FRAME = re.compile(r'//## File "([^"]+)", line (\d+)')
INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\S+):$")
PIPE = "ws_pipeline.cuh"
CALLS = {"task.template produce<Regs::kWideProducer, ws_pair": "producer",
         "ws_math<Task, WsRole::kScores": "scores", "ws_math<Task, WsRole::kValues": "values",
         # kTransposed*: warpgroup 0 alone does the math, warpgroups 1-2 both produce
         "ws_math_t<Task": "math", "task.template produce<Regs::kWideProducer, false>": "producer"}
# (The measured-and-gone kDuo and kTrio had their own role calls: 8063be8 and the seventh
# 2026-12-02 session's PERFORMANCE.md section map them.)


def read_csv(path):
    lines = open_text(path).read().splitlines()
    kernel = next((l.split('","')[1].rstrip('",') for l in lines[:3] if l.startswith('"Kernel Name"')), "")
    start = next(i for i, l in enumerate(lines) if "Source" in l and "Address" in l)
    return kernel, list(csv.DictReader(lines[start:]))


def kernel_keys(name):
    """Mangled-name fragments of the kernel ncu printed demangled: its name, 'WsMathE<n>E'."""
    m, w = re.search(r"(\w+_kernel)<", name), re.search(r"\(jfm::WsMath\)(\d+)", name)
    return ([f"{len(m.group(1))}{m.group(1)}I"] if m else []) + ([f"WsMathE{w.group(1)}E"] if w else [])


def role_lines(pipeline):
    """{line of ws_pipeline.cuh: role}: ws_run's three role calls and the setmaxnreg line above each."""
    out = {}
    with open(pipeline) as f:
        src = f.read().splitlines()
    for i, l in enumerate(src, 1):
        for key, role in CALLS.items():
            if key in l:
                out[i] = out[i - 1] = role
    return out


def disassemble(obj, keys, bindir):
    """(name, [[offset, sass with labels as offsets, call chain innermost first]]) of one kernel."""
    tool = lambda name: os.path.join(bindir, name) if bindir else name
    with tempfile.TemporaryDirectory() as tmp:
        cubins = [obj]
        if not obj.endswith(".cubin"):
            subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(obj)], cwd=tmp,
                           check=True, capture_output=True)
            cubins = glob.glob(os.path.join(tmp, "*.cubin"))
        text = "".join(subprocess.run([tool("nvdisasm"), "-c", "-gi", c], check=True,
                                      capture_output=True, text=True).stdout for c in cubins)
    sections = re.split(r"^//-+ \.text\.(\S+) -+$", text, flags=re.M)
    pick = [i for i, n in enumerate(sections[1::2]) if all(k in n for k in keys)]
    if len(pick) != 1:
        sys.exit(f"kernel keys {keys} match {len(pick)} of: " + " ".join(sections[1::2]))
    insns, labels, pending, chain, fresh = [], {}, [], (), True
    for line in sections[2 + 2 * pick[0]].splitlines():
        f, i, l = FRAME.search(line), INSN.match(line), LABEL.match(line.strip())
        if f:  # a block of frames (innermost first) annotates the instructions that follow
            chain = (() if fresh else chain) + ((os.path.basename(f.group(1)), int(f.group(2))),)
            fresh = False
        elif i:
            labels.update((p, int(i.group(1), 16)) for p in pending)
            insns.append([int(i.group(1), 16), i.group(2), chain])
            pending, fresh = [], True
        elif l:
            pending.append(l.group(1))
    for it in insns:
        it[1] = re.sub(r"`\(([^)]+)\)", lambda m: hex(labels.get(m.group(1), -1)), it[1])
    return sections[1 + 2 * pick[0]], insns


def norm(sass, base=0):
    """Sorted tokens; .reuse and (*comments*) dropped; absolute addresses made offsets from `base`."""
    sass = re.sub(r"\(\*.*?\*\)|\.reuse", "", sass)
    sass = re.sub(r"0x7f[0-9a-f]{10}", lambda m: hex(int(m.group(0), 16) - base), sass)
    return sorted(t for t in re.split(r"[,\s]+", sass) if t)


def opcode(sass):
    return next((t for t in sass.split() if not t.startswith("@")), "?")


def assign_roles(insns, rl):
    """Per instruction [role, role-level line, innermost line]; and the instructions inferred."""
    call = {ch[i + 1] for _, _, ch in insns for i, f in enumerate(ch[:-1]) if f[0] == PIPE and f[1] in rl}
    out = []
    for _, _, ch in insns:
        inner = "%s:%d" % ch[0] if ch else "?"
        if len(ch) >= 2 and ch[-1] in call and ch[-2][0] == PIPE:
            role = rl.get(ch[-2][1], "common")
            out.append([role, "%s:%d" % ch[-3] if role != "common" and len(ch) >= 3 else inner, inner])
        else:  # no ws_run frame: common outside the ws_run call, else ambiguous
            out.append(["common" if ch and ch[-1] not in call else None, inner, inner])
    runs = []  # [role, first, end)
    for i, o in enumerate(out):
        if runs and runs[-1][0] == o[0]:
            runs[-1][2] = i + 1
        else:
            runs.append([o[0], i, i + 1])
    fixed = []
    for j, (role, a, b) in enumerate(runs):
        prev = next((r[0] for r in reversed(runs[:j]) if r[0]), None)
        nxt = next((r[0] for r in runs[j + 1:] if r[0]), None)
        if role is None or (b - a <= 2 and prev == nxt and prev not in (None, role) and role != "common"):
            for i in range(a, b):
                out[i][0] = prev if prev == nxt and prev else "unknown"
                fixed.append(i)
    return out, fixed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("obj", help="cubin, or .o with an embedded sm_90a cubin")
    ap.add_argument("--kernel", help="substring of the mangled kernel name (default: from the CSV)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--steps", type=int, default=6, help="role-level lines shown per role")
    ap.add_argument("--bin", default=os.environ.get("NVDISASM_DIR", ""), help="dir of nvdisasm/cuobjdump")
    ap.add_argument("--pipeline", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                       "csrc", "kernels", "sm90", "decode", PIPE))
    args = ap.parse_args()
    kname, rows = read_csv(args.csv)
    header = list(rows[0].keys())
    col_addr, col_src = find(header, "address"), find(header, "source")
    col_all = find(header, "warp stall sampling", "all")
    col_exec = find(header, "instructions executed", exclude=("thread",))
    reasons = [h for h in header if h.startswith("stall_") and "not issued" not in h.lower()]
    name, insns = disassemble(args.obj, [args.kernel] if args.kernel else kernel_keys(kname), args.bin)
    a0 = int(rows[0][col_addr], 16)
    pairs = [(int(r[col_addr], 16) - a0 == i[0], r[col_src], i[1]) for r, i in zip(rows, insns)]
    same_op = sum(o and opcode(a) == opcode(b) for o, a, b in pairs)
    same = sum(o and norm(a, a0) == norm(b) for o, a, b in pairs)
    print(f"{kname}\n  local {name}: {len(insns)} instructions, csv {len(rows)}; same offset+opcode "
          f"{same_op}, same operands too {same}")
    if len(insns) != len(rows):
        sys.exit("  the local object is not the profiled build (instruction counts differ): rebuild "
                 "it with the device build's flags (-lineinfo, the same CUDAFLAGS)")
    if same_op != len(rows):
        print("  WARNING: the SASS differs; the attribution below is unreliable")

    info, fixed = assign_roles(insns, role_lines(args.pipeline))
    if all(i[0] == "common" for i in info):
        print("  WARNING: no instruction has a role: ws_pipeline.cuh's lines here are not the ones the "
              "object was built from (run this from a checkout of the built commit, or --pipeline)")
    per_role, per_step, per_line = (collections.defaultdict(collections.Counter) for _ in range(3))
    hot = {}  # per_line key -> (samples, offset, the BAR / try-wait <= 4 instructions before it)
    for i, (r, (role, step, inner), (off, sass, _)) in enumerate(zip(rows, info, insns)):
        n = number(r[col_all])
        for c in (per_role[role], per_step[(role, step)], per_line[(role, step, inner)]):
            c["all"] += n
            c["insns"] += 1
            c["op:" + opcode(sass)] += n
            for x in reasons:
                c[x] += number(r[x])
        if opcode(sass).startswith("HGMMA"):
            per_role[role]["hgmma:" + opcode(sass).split(".")[1]] += 1
        if n > hot.get((role, step, inner), (-1,))[0]:
            waits = [x[1] for x in insns[max(0, i - 4):i] if re.match(r"(@\S+ +)?(BAR\.|SYNCS\.PHASECHK)", x[1])]
            hot[(role, step, inner)] = (n, off, waits[-1] if waits else "")
    total = sum(c["all"] for c in per_role.values()) or 1
    print(f"  {total:.0f} samples; {len(fixed)} instructions ({sum(number(rows[i][col_all]) for i in fixed):.0f}"
          f" samples) took their neighbours' role\n\nper role (4 warps each, the transposed kernels' "
          f"producer 8; HGMMA shapes), then its top role-level lines:")
    transposed = "math" in per_role
    for role in ROLES:
        c = per_role.get(role)
        if c and c["insns"]:
            hg = " ".join(f"{k[6:]}:{v}" for k, v in sorted(c.items()) if k.startswith("hgmma:"))
            warps = 8 if transposed and role == "producer" else 4
            print(f"  {role:8s} {c['all']:7.0f} {100 * c['all'] / total:5.1f}%  /warp {c['all'] / warps:6.0f}  "
                  f"{c['insns']:4d}i  {why(c, reasons, 4)}  [{hg}]")
            steps = sorted(((v["all"], k[1], v) for k, v in per_step.items() if k[0] == role), reverse=True)
            for n, line, v in steps[: args.steps]:
                print(f"      {n:7.0f} {100 * n / total:5.1f}%  {line:24s} {why(v, reasons, 3)}")
    print(f"\ntop {args.top} (role, role-level line, innermost line, instructions, hottest offset "
          f"[BAR / try-wait before it], opcodes, reasons):")
    for key, c in sorted(per_line.items(), key=lambda kv: -kv[1]["all"])[: args.top]:
        ops = ",".join(k[3:] for k, _ in sorted(((k, v) for k, v in c.items() if k.startswith("op:")),
                                                 key=lambda kv: -kv[1])[:2])
        _, off, wait = hot[key]
        wait = " ".join(t for t in wait.split() if not t.startswith("@"))[:34]
        print(f"  {c['all']:6.0f} {100 * c['all'] / total:5.1f}%  {key[0]:8s} {key[1]:22s} {key[2]:26s} "
              f"{c['insns']:3d}i {off:6x}{' [' + wait + ']' if wait else ''}  {ops:30s} {why(c, reasons, 3)}")
    if col_exec:
        print_trywaits(rows, insns, info, col_all, col_exec)


def print_trywaits(rows, insns, info, col_all, col_exec):
    """Each mbarrier try-wait: executions; for a retry loop the exits; samples to its branch."""
    print("\nmbarrier try-waits (warp-level executions; samples from the try-wait to its branch):")
    for i, (off, sass, _) in enumerate(insns[:-2]):
        if "SYNCS.PHASECHK" not in sass:
            continue
        pred = re.search(r"TRYWAIT (P\d)", sass).group(1)
        j = next((j for j in range(i + 1, min(i + 17, len(insns))) if re.match(rf"@!?{pred} +BRA", insns[j][1])), i)
        m = re.search(r"BRA (0x[0-9a-f]+)", insns[j][1])
        loop = m is not None and int(m.group(1), 16) <= off  # the out-of-line retry loop
        exits = f", exits {number(rows[j + 1][col_exec]):.0f}" if loop else ""
        bar = re.search(r"\[(.*?)\]", sass).group(1)
        print(f"  {off:6x} {info[i][0]:8s} {info[i][1]:22s} [{bar}] "
              f"{'retry loop' if loop else 'first try '} execs {number(rows[i][col_exec]):8.0f}{exits}; "
              f"samples {sum(number(rows[k][col_all]) for k in range(i, j + 1)):.0f}")


def why(c, reasons, n):
    top = sorted(((c[r], r) for r in reasons), reverse=True)[:n]
    return ", ".join(f"{r[6:]} {100 * v / c['all']:.0f}%" for v, r in top if v > 0 and c["all"])


if __name__ == "__main__":
    main()
