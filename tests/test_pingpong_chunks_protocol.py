"""A randomized model of WsMath::kPingPongChunks' barrier protocol (ws_pipeline.cuh ws_math_ppc,
dense/kernel_ws.cuh dense_produce_chunks), checked on 3,000 random schedules before the kernel has
run on a GPU: the producer and the two math warpgroups as generators stepped in random order,
mbarriers with phases and parity waits, TMA landings and cp.async tiles as delayed events,
sequences of 0-7 tiles. Checked: no deadlock; every read of a chunk (S, the mask's validity bytes,
each P V half) sees the tile it expects, at its issue and at its wait; P and the published row
maxima are never overwritten unread. Mutations of the protocol are caught (a skipped empty wait, the
rope chunk released before S, warpgroup 0's first tile not peeled: the last test; P published
before the take: checked by hand).
Keep it in step with the kernel: it is the protocol's specification until the GPU tests run."""
import random

class Bar:
    def __init__(s, count): s.count, s.n, s.phase, s.tx = count, 0, 0, 0
    def arrive(s, k=1, tx=0):
        s.n += k; s.tx += tx; s._check()
    def land(s, tx):
        s.tx -= tx; s._check()
    def _check(s):
        if s.n >= s.count and s.tx == 0:
            assert s.n == s.count, "too many arrivals"
            s.n = 0; s.phase += 1
    def passed(s, parity):  # try_wait.parity
        return (s.phase & 1) != parity

class World:
    def __init__(s, rng, seqs):
        s.rng = rng; s.seqs = seqs
        s.full = {(b, c): Bar(256 if c == 0 else 128) for b in range(2) for c in range(3)}
        s.empty = {(b, c): Bar(128) for b in range(2) for c in range(3)}
        s.pub = [Bar(128), Bar(128)]
        s.sync = {'n': 0, 'gen': 0}   # the 256-thread named barrier (both warpgroups)
        s.data = {(b, c): None for b in range(2) for c in range(3)}  # tile index held
        s.valid = [None, None]
        s.P = None; s.P_read = True
        s.red = [None, None]; s.red_read = [True, True]
        s.pending = []  # (time, fn)
        s.t = 0

def producer(w):
    k = 0
    for T in w.seqs:
        for i in range(T):
            b, fp = k & 1, ((k >> 1) & 1) ^ 1
            owner = i & 1
            tma = w.rng.random() < 0.8
            if tma:
                for c in (0, 1 + owner, 2 - owner):
                    while not w.empty[(b, c)].passed(fp): yield
                    if c == 0: w.valid[b] = k
                    # thread 0's expect_tx + the boxes' landing later
                    w.full[(b, c)].arrive(1, tx=1)
                    def land(b=b, c=c, k=k):
                        w.data[(b, c)] = k; w.full[(b, c)].land(1)
                    w.pending.append((w.t + w.rng.randint(1, 30), land))
                    w.full[(b, c)].arrive(127)
                    if c == 0: w.full[(b, 0)].arrive(128)
                    yield
            else:
                for c in range(3):
                    while not w.empty[(b, c)].passed(fp): yield
                w.valid[b] = k
                w.full[(b, 0)].arrive(128)
                def land(b=b, k=k):
                    for c in range(3):
                        w.data[(b, c)] = k; w.full[(b, c)].arrive(128)
                w.pending.append((w.t + w.rng.randint(1, 30), land))
                yield
            k += 1

def math(w, kW, log):
    k = 0
    def sync():
        gen = w.sync['gen']; w.sync['n'] += 1
        if w.sync['n'] == 2: w.sync['n'] = 0; w.sync['gen'] += 1
        while w.sync['gen'] == gen: yield
    def wait(bar, par):
        while not bar.passed(par): yield
    def read_chunk(b, c, kk, what):
        assert w.data[(b, c)] == kk, f"wg{kW} {what}: chunk {(b, c)} holds tile {w.data[(b, c)]}, wants {kk}"
    def take(kt):
        yield from wait(w.pub[kt & 1], (kt >> 1) & 1)
        assert w.red[kt & 1] == kt, f"red slot {kt & 1} holds {w.red[kt & 1]}, wants {kt}"
        w.red_read[kt & 1] = True
        assert w.P == kt, f"P holds {w.P}, wants {kt}"
        read_chunk(kt & 1, 1 + kW, kt, "take issue")
        yield  # the P V in flight
        yield
        read_chunk(kt & 1, 1 + kW, kt, "take wait")
        assert w.P == kt, f"P overwritten during take of {kt}"
        w.P_read = True
        w.empty[(kt & 1, 1 + kW)].arrive(128)
    def own(kk, with_take):
        b, par = kk & 1, (kk >> 1) & 1
        yield from wait(w.full[(b, 0)], par)
        yield from wait(w.full[(b, 1 + kW)], par)
        assert w.valid[b] == kk
        read_chunk(b, 0, kk, "S"); read_chunk(b, 1 + kW, kk, "S")
        yield
        read_chunk(b, 0, kk, "S wait"); read_chunk(b, 1 + kW, kk, "S wait")
        yield from wait(w.full[(b, 2 - kW)], par)
        read_chunk(b, 2 - kW, kk, "S2"); yield; read_chunk(b, 2 - kW, kk, "S2 wait")
        assert w.valid[b] == kk, "validity bytes overwritten before the mask"
        w.empty[(b, 0)].arrive(128)
        if with_take: yield from take(kk - 1)
        # publish
        assert w.P_read, f"P of tile {w.P} overwritten unread (by {kk})"
        assert w.red_read[b], f"red slot {b} ({w.red[b]}) overwritten unread (by {kk})"
        w.P, w.P_read = kk, False
        w.red[b], w.red_read[b] = kk, False
        w.pub[b].arrive(128)
        read_chunk(b, 1 + kW, kk, "own P V"); yield; yield
        read_chunk(b, 1 + kW, kk, "own P V wait")
        w.empty[(b, 1 + kW)].arrive(128)
    for T in w.seqs:
        yield from sync(); yield from sync()  # ws_load_q
        i = 0
        if kW == 0 and T > 0:
            yield from own(k, False); k += 1; i += 1
        while i < T:
            if (i & 1) == kW: yield from own(k, True)
            elif i + 1 >= T: yield from take(k)
            k += 1; i += 1
        yield from sync()  # tile_finish
        w.red = ['finish', 'finish']; w.red_read = [True, True]
        yield from sync()
    log.append(kW)

def run(seed):
    rng = random.Random(seed)
    seqs = [rng.choice([0, 1, 1, 2, 3, 4, 5, 7]) for _ in range(rng.randint(1, 6))]
    w = World(rng, seqs)
    log = []
    procs = [producer(w), math(w, 0, log), math(w, 1, log)]
    alive = list(procs)
    steps = 0
    while alive or w.pending:
        steps += 1
        if steps > 200000: raise AssertionError(f"no progress: seqs {seqs}")
        w.t += 1
        due = [p for p in w.pending if p[0] <= w.t]
        for p in due: w.pending.remove(p); p[1]()
        if not alive: continue
        p = rng.choice(alive)
        try: next(p)
        except StopIteration: alive.remove(p)
    assert sorted(log) == [0, 1], "a warpgroup did not finish"
    # the producer finished too; every phase balanced
    return seqs



def test_random_schedules():
    for seed in range(3000):
        run(seed)


MUTATIONS = {  # (what the kernel would get wrong, the source edit that models it)
    "producer skips the late chunk's empty wait":
        ("while not w.empty[(b, c)].passed(fp): yield\n                    if c == 0",
         "while c != 2 - owner and not w.empty[(b, c)].passed(fp): yield\n                    if c == 0"),
    "rope chunk released before S reads it":
        ("        assert w.valid[b] == kk\n        read_chunk(b, 0, kk, \"S\")",
         "        assert w.valid[b] == kk\n        w.empty[(b, 0)].arrive(128)\n        read_chunk(b, 0, kk, \"S\")"),
    "warpgroup 0's first tile not peeled": ("        if kW == 0 and T > 0:", "        if False:"),
}


def test_the_model_catches_protocol_mutations():
    import inspect
    import sys
    src = inspect.getsource(sys.modules[__name__])
    src = src[:src.index("\ndef test_random_schedules")]  # the model alone
    for name, (a, b) in MUTATIONS.items():
        assert src.count(a) == 1, name
        mutated = src.replace(a, b)
        ns = {"__name__": "mutant"}
        exec(compile(mutated, "mutant", "exec"), ns)
        caught = False
        for seed in range(300):
            try:
                ns["run"](seed)
            except AssertionError:
                caught = True
                break
        assert caught, name
