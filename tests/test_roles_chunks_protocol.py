"""A randomized model of WsMath::kRolesChunks' barrier protocol (ws_pipeline.cuh ws_math's kChunks,
sparse/kernel_ws.cuh produce's kChunks branch), checked on random schedules before the kernel has
run on a GPU: the producer and the two math warpgroups as generators stepped in random order,
mbarriers with phases and parity waits, each chunk's cp.async copies landing later, sequences of
0-7 tiles. Checked: no deadlock; every read of a chunk (S's two batches, the mask's validity bytes,
each P V half) sees the tile it expects at its issue and at its wait; P is never overwritten
before the values warpgroup has read it. Three mutations of the protocol are caught (the last
test). Keep it in step with the kernel until its GPU tests have run."""
import random

import pytest


class Bar:
    """An mbarrier: `count` arrivals complete a phase; try_wait.parity passes once the phase of
    that parity has completed."""

    def __init__(self, count):
        self.count, self.n, self.phase = count, 0, 0

    def arrive(self, k=1):
        self.n += k
        assert self.n <= self.count, "too many arrivals in a phase"
        if self.n == self.count:
            self.n, self.phase = 0, self.phase + 1

    def passed(self, parity):
        return (self.phase & 1) != parity


class World:
    def __init__(self, rng, seqs, mutation):
        self.rng, self.seqs, self.mutation = rng, seqs, mutation
        self.full = [Bar(256), Bar(256)]     # chunk 0: validity bytes (128) + copies (128)
        self.full1 = [Bar(128), Bar(128)]    # chunk 1: copies
        self.empty = [Bar(128), Bar(128)]    # chunk 0: the scores warpgroup
        self.empty1 = [Bar(128), Bar(128)]   # chunk 1: the values warpgroup
        self.p_ready, self.p_free = Bar(128), Bar(128)
        self.data = {(b, c): None for b in range(2) for c in range(2)}  # the tile a chunk holds
        self.valid = [None, None]
        self.P, self.P_read = None, True
        self.stats = {"n": 0, "gen": 0}  # the end-of-sequence exchange between the warpgroups
        self.pending, self.t = [], 0

    def later(self, fn):
        self.pending.append((self.t + self.rng.randint(1, 40), fn))


def sequences(w):
    """Each sequence's tiles as the CTA's running tile counts k (every actor counts alike)."""
    out, k = [], 0
    for tiles in w.seqs:
        out.append(range(k, k + tiles))
        k += tiles
    return out


def wait(bar, parity):
    while not bar.passed(parity):
        yield


def producer(w):
    for seq in sequences(w):
        for k in seq:
            b, fp = k & 1, ((k >> 1) & 1) ^ 1
            yield from wait(w.empty[b], fp)
            landed = {}

            def land0(b=b, k=k):
                w.data[(b, 0)] = k
                landed[0] = True
                w.full[b].arrive(128)  # noinc: this thread's earlier copies have landed

            w.later(land0)
            w.valid[b] = k
            w.full[b].arrive(128)  # the validity bytes
            yield
            if w.mutation != "producer skips empty1":
                yield from wait(w.empty1[b], fp)

            def land1(b=b, k=k):
                w.data[(b, 1)] = k
                # noinc arrival on full1: once every earlier copy of the thread has landed too
                def arrive():
                    if landed.get(0):
                        w.full1[b].arrive(128)
                    else:
                        w.later(arrive)
                arrive()

            w.later(land1)
            yield


def scores(w):
    for seq in sequences(w):
        for k in seq:
            b, par = k & 1, (k >> 1) & 1
            yield from wait(w.full[b], par)

            def read(c, what, k=k, b=b):
                assert w.data[(b, c)] == k, f"scores {what}: chunk {(b, c)} holds {w.data[(b, c)]}, wants {k}"
            read(0, "S1")
            yield
            read(0, "S1 wait")
            yield from wait(w.full1[b], par)
            read(1, "S2")
            yield
            read(1, "S2 wait")
            assert w.valid[b] == k, "validity bytes not this tile's at the mask"
            if w.mutation == "scores releases chunk 0 at the mask":
                w.empty[b].arrive(128)
            yield  # softmax
            yield from wait(w.p_free, (k & 1) ^ 1)
            assert w.P_read, f"P of tile {w.P} overwritten unread by tile {k}"
            w.P, w.P_read = k, False
            w.p_ready.arrive(128)
            read(0, "P V")
            yield
            read(0, "P V wait")
            if w.mutation != "scores releases chunk 0 at the mask":
                w.empty[b].arrive(128)
        yield from exchange(w)


def values(w):
    for seq in sequences(w):
        for k in seq:
            b, par = k & 1, (k >> 1) & 1
            # (Implied by p_ready, whose S waited for full1; the kernel keeps it for the proxy fence.)
            yield from wait(w.full1[b], par)
            yield from wait(w.p_ready, k & 1)
            assert w.P == k, f"values: P holds {w.P}, wants {k}"
            assert w.data[(b, 1)] == k, f"values P V: chunk {(b, 1)} holds {w.data[(b, 1)]}, wants {k}"
            if w.mutation == "values release chunk 1 at the P V's issue":
                w.empty1[b].arrive(128)
            yield
            assert w.data[(b, 1)] == k, f"values P V wait: chunk {(b, 1)} holds {w.data[(b, 1)]}"
            assert w.P == k, f"P overwritten during the values' P V of {k}"
            w.P_read = True
            w.p_free.arrive(128)
            if w.mutation != "values release chunk 1 at the P V's issue":
                w.empty1[b].arrive(128)
        yield from exchange(w)


def exchange(w):
    """ws_finish_rows: the scores hand the rows' totals to the values (stats_ready / free)."""
    gen = w.stats["gen"]
    w.stats["n"] += 1
    if w.stats["n"] == 2:
        w.stats["n"], w.stats["gen"] = 0, gen + 1
    while w.stats["gen"] == gen:
        yield


def run(seed, mutation=None):
    rng = random.Random(seed)
    seqs = [rng.randint(0, 7) for _ in range(rng.randint(1, 5))]
    w = World(rng, seqs, mutation)
    actors = [producer(w), scores(w), values(w)]
    live = list(actors)
    for _ in range(200000):
        w.t += 1
        due = [p for p in w.pending if p[0] <= w.t]
        w.pending = [p for p in w.pending if p[0] > w.t]
        for _, fn in due:
            fn()
        if not live and not w.pending:
            return
        if live:
            a = rng.choice(live)
            try:
                next(a)
            except StopIteration:
                live.remove(a)
    raise AssertionError(f"deadlock: seqs {seqs}")


def test_protocol_holds_on_random_schedules():
    for seed in range(1500):
        run(seed)


@pytest.mark.parametrize("mutation", ["producer skips empty1", "scores releases chunk 0 at the mask",
                                      "values release chunk 1 at the P V's issue"])
def test_mutations_are_caught(mutation):
    with pytest.raises(AssertionError):
        for seed in range(1500):
            run(seed, mutation)
