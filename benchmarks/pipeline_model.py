"""A discrete-event model of one SM's dense h_q 128 tile pipeline (d_qk 576, two tile buffers):
the role split (WsMath::kRolesPair's math: the scores warpgroup's S, softmax and P V half, the
values warpgroup's P V half) against the math warpgroups owning alternate tiles ("ping-pong"),
with whole-tile buffers (form A: the other's previous tile taken after this tile's S; form B:
before it) or buffers released and refilled in three chunks (the rope block, each warpgroup's
value half: the gone WsMath::kPingPongChunks, f8ecc33; form C: the take between S's two
batches). The tensor pipe is shared by processor sharing; a warpgroup's wgmma batch, its softmax
and an mbarrier hand-off are fixed costs (cycles).

Why: before a ping-pong schedule is written, to see whether any order of it can beat the role
split. Measured on the H100 (docs/PERFORMANCE.md, fourth and fifth 2026-12-06 sessions), kernel
time over the role split's: whole-tile A 1.20-1.37x, B 1.07-1.13x, chunked A 1.23-1.33x. The
model gives 1.31x, 1.08x and 1.26x with the refill latencies the chunked kernel's tile-phase
probe showed (a chunk ~2500 cycles from its release to the wait's end: as slow as a whole tile,
latency rather than bytes). Its first calibration (a tile 1500, a chunk 1100 cycles, fitted to
form A and B alone) predicted 0.88x for the chunked form: the refill latency is the input the
ping-pong's result turns on, so measure it (the probe's "fill") before trusting a prediction.
At the calibrated latencies form C, the best order, is 1.04x. It is a model: its absolute
periods are ~15% below the measured ones; read its ratios.

role_split(chunks=True) models kRolesChunks (the bf16 sparse role split with two-chunk buffers,
removed after measurement; 1.08-1.10x the role split on prefill, H100). Predicted 0.93-0.98x at
prefill d576 h128 8K, assuming a chunk refills faster than the tile (3494 cycles); its probe
measured 4342, and with that the model gives 1.10x. Same lesson as the ping-pong: under the
prefill's load a refill's latency does not shrink with its bytes.

role_split(pv_after_s=True) and role_split(split_s=True) model two reorders of the role split
that give the values warpgroup tensor work during the scores' softmax (JFM_WS_PV_AFTER_S and
JFM_WS_SPLIT_S, first 2026-12-07 session, both written, measured slower and removed). The model
gives 1.27x and 1.24x at the dense calibration; measured: 1.23x (dense h128 s_q 2 causal) and
1.12-1.28x (prefill d512). Both hand a buffer back later, and the refill latency is longer than
what they save; at a refill of ~1000 cycles or less both would win. Run a candidate schedule
through this model before writing it.

seesaw() models upstream FlashMLA's own order (two math warpgroups, each its own tile's S and
softmax, O split by columns, no producer: half-pages refilled by their last reader, S waiting per
64-column box). At this calibration it is 0.97x the role split with per-box barriers (1.05x with
per-half ones), and only while a half-page's first box lands within ~1200 cycles of its issue
(1.09x at 1800): its softmax stays on the chain too (warpgroup 1's takes warpgroup 0's row
maxima), so the order alone does not explain upstream's ~7% lead at h_q 128.

Usage: python benchmarks/pipeline_model.py [--sweep]
"""
from __future__ import annotations

import argparse
import heapq
import itertools

P = dict(
    s_work=1152,     # S of a 64x64 tile over d_qk 576: tensor cycles at the full rate
    pv_work=512,     # one P V half (256 value columns)
    softmax=880,     # mask + softmax + P stores + publication (H200 tile-phase probe)
    handoff=150,     # an mbarrier hand-off to a waiting warpgroup
    handoff_done=60,  # a try_wait on an already completed phase
    l_tile=1800,     # a whole tile's refill: empty -> full (TMA from L2; fitted to form A)
    l_chunk=2500,    # one chunk's refill, in order behind the others (kPingPongChunks' probe)
    wgmma_lat=60,    # issue latency of a wgmma batch
    # seesaw (upstream's order) only:
    l_first=1200,    # a half-page refill: issue -> its first 8 KB box landed
    l_box=150,       # each further box of that refill
    p_share=150,     # P rescaled by the other's correction and stored for the other (stmatrix)
    o_rescale=100,   # O's half rescaled by the other's correction (128 registers per thread)
)
NT = 400  # tiles simulated (the period is read over the second half)


class Sim:
    def __init__(self):
        self.t, self.q, self.cnt = 0.0, [], itertools.count()
        self.active, self.last, self.ver = {}, 0.0, 0

    def at(self, t, fn):
        heapq.heappush(self.q, (t, next(self.cnt), fn))

    def _advance(self, t):
        if self.active:
            d = (t - self.last) / len(self.active)
            for job in self.active.values():
                job[0] -= d
        self.last = t

    def tensor(self, work, cb):
        """A wgmma batch of `work` cycles on the shared tensor pipe; cb when it completes."""
        def start():
            self._advance(self.t)
            self.active[next(self.cnt)] = [work, cb]
            self._schedule()
        self.at(self.t + P["wgmma_lat"], start)

    def _schedule(self):
        if not self.active:
            return
        jid, job = min(self.active.items(), key=lambda kv: kv[1][0])
        self.ver += 1
        ver = self.ver

        def finish():
            if self.ver != ver:
                return
            self._advance(self.t)
            cb = self.active.pop(jid)[1]
            self._schedule()
            cb()
        self.at(self.t + job[0] * len(self.active), finish)

    def run(self):
        while self.q:
            self.t, _, fn = heapq.heappop(self.q)
            fn()


class Flag:
    """One mbarrier phase: set once, waiters resume after a hand-off."""
    def __init__(self, sim):
        self.sim, self.done, self.waiters = sim, False, []

    def set(self, delay=0.0):
        def fire():
            self.done = True
            for cb in self.waiters:
                self.sim.at(self.sim.t + P["handoff"], cb)
            self.waiters = []
        self.sim.at(self.sim.t + delay, fire)

    def wait(self, cb):
        if self.done:
            self.sim.at(self.sim.t + P["handoff_done"], cb)
        else:
            self.waiters.append(cb)


def _period(done):
    ks = sorted(done)
    a, b = ks[len(ks) // 2], ks[-1]
    return (done[b] - done[a]) / (b - a)


def role_split(chunks=False, pv_after_s=False, split_s=False, bufs=2):
    """chunks: kRolesChunks, the buffer in two chunks (blocks 0-3 + RoPE, released by the scores'
    P V; blocks 4-7, by the values'), each refilled l_chunk after its release, S's first batch
    (20 of 36 k-steps at d_qk 576) before the second chunk has landed. Without: the whole tile
    refilled l_tile after both releases, S in one batch.
    pv_after_s (the gone JFM_WS_PV_AFTER_S): the values warpgroup issues tile k's P V half only
    once the scores' S of tile k + 1 has completed. split_s (the gone JFM_WS_SPLIT_S): the values
    warpgroup computes half of tile k + 1's S (once that tile is full) before tile k's P V, and
    the scores warpgroup its other half, then waits for the values' half (a hand-off).
    bufs: tile buffers in the ring (2 at 64 tokens; 4 models 32-token tiles in the same shared
    memory, with s_work, pv_work and softmax set to a 32-token tile's)."""
    sim = Sim()
    s_done = [Flag(sim) for _ in range(NT)]  # pv_after_s: the scores' S of tile k completed
    part = [Flag(sim) for _ in range(NT)]    # split_s: the values' half of tile k's S
    full = {(k, c): Flag(sim) for k in range(NT) for c in range(2)}
    free = {(k, c): Flag(sim) for k in range(NT) for c in range(2)}
    p_ready, p_free = [Flag(sim) for _ in range(NT)], [Flag(sim) for _ in range(NT)]
    done = {}
    lat = P["l_chunk"] if chunks else P["l_tile"]
    for k in range(NT):
        for c in range(2):
            if k < bufs:
                full[(k, c)].set(lat)
            elif chunks:
                free[(k - bufs, c)].wait(lambda k=k, c=c: full[(k, c)].set(lat))
            else:
                free[(k - bufs, 0)].wait(lambda k=k, c=c: free[(k - bufs, 1)].wait(
                    lambda: full[(k, c)].set(lat)))

    def scores(k):
        if k >= NT:
            return

        def after_s():
            def publish():
                p_ready[k].set()
                sim.tensor(P["pv_work"], lambda: (free[(k, 0)].set(), scores(k + 1)))
            sim.at(sim.t + P["softmax"],
                   lambda: publish() if k == 0 else p_free[k - 1].wait(publish))
        def s_complete():
            s_done[k].set()
            after_s()
        if chunks:
            full[(k, 0)].wait(lambda: sim.tensor(P["s_work"] * 20 / 36, lambda: full[(k, 1)].wait(
                lambda: sim.tensor(P["s_work"] * 16 / 36, after_s))))
        elif split_s:
            full[(k, 0)].wait(lambda: sim.tensor(P["s_work"] / 2, lambda: part[k].wait(after_s)))
        else:
            full[(k, 0)].wait(lambda: sim.tensor(P["s_work"], s_complete))

    def values_half_s(k, cb):  # split_s: the values' half of tile k's S
        full[(k, 1)].wait(lambda: sim.tensor(P["s_work"] / 2, lambda: (part[k].set(), cb())))

    def values(k):
        if k >= NT:
            return
        def pv():
            sim.tensor(P["pv_work"], lambda: (
                p_free[k].set(), free[(k, 1)].set(), done.__setitem__(k, sim.t), values(k + 1)))
        if pv_after_s and k + 1 < NT:
            pv_now = lambda: s_done[k + 1].wait(pv)
        else:
            pv_now = pv
        # (kRolesChunks: the values warpgroup waits for its chunk; whole tiles: S has waited)
        take = lambda: p_ready[k].wait(lambda: full[(k, 1)].wait(pv_now) if chunks else pv_now())
        if split_s and k + 1 < NT:
            values_half_s(k + 1, take)
        else:
            take()
    scores(0)
    if split_s:
        values_half_s(0, lambda: values(0))
    else:
        values(0)
    sim.run()
    return _period(done)


def ping_pong(form, chunks):
    """form 'A': the other's previous tile taken after this tile's S; 'B': before it; 'C' (with
    chunks only): between S's two batches."""
    sim = Sim()
    pub = [Flag(sim) for _ in range(NT)]
    full = {(k, c): Flag(sim) for k in range(NT) for c in range(3)}  # chunk 0: rope, 1 + w: half w
    rel = {(k, c): Flag(sim) for k in range(NT) for c in range(3)}
    done = {}
    for k in range(NT):
        lat = P["l_chunk"] if chunks else P["l_tile"]
        if k < 2:
            for c in range(3):
                full[(k, c)].set(lat)
        elif chunks:
            for c in range(3):
                rel[(k - 2, c)].wait(lambda k=k, c=c: full[(k, c)].set(lat))
        else:
            rel[(k - 2, 0)].wait(lambda k=k: rel[(k - 2, 1)].wait(lambda: rel[(k - 2, 2)].wait(
                lambda: [full[(k, c)].set(lat) for c in range(3)])))

    def wg(w, k):
        if k % 2 != w:
            k += 1
        if k >= NT:
            return
        early, late = 1 + w, 2 - w

        def s(cb):  # the rope block and this half first, then the other half
            def second():
                full[(k, late)].wait(lambda: sim.tensor(P["s_work"] * 16 / 36, lambda: (
                    rel[(k, 0)].set() if chunks else None, cb())))
            full[(k, 0)].wait(lambda: full[(k, early)].wait(
                lambda: sim.tensor(P["s_work"] * 20 / 36, second)))

        def take(cb):
            if k == 0:
                cb()
                return
            pub[k - 1].wait(lambda: sim.tensor(P["pv_work"], lambda: (rel[(k - 1, 1 + w)].set(), cb())))

        def softmax_and_own_pv():
            def own_pv():
                sim.tensor(P["pv_work"], lambda: (
                    rel[(k, 1 + w)].set(), None if chunks else rel[(k, 0)].set(),
                    done.__setitem__(k, sim.t), wg(w, k + 2)))
            sim.at(sim.t + P["softmax"], lambda: (pub[k].set(), own_pv()))
        if form == "A":
            s(lambda: take(softmax_and_own_pv))
        elif form == "B":
            take(lambda: s(softmax_and_own_pv))
        else:  # "C" (chunks): between S's rope-and-own-half batch and its other-half batch
            full[(k, 0)].wait(lambda: full[(k, early)].wait(lambda: sim.tensor(
                P["s_work"] * 20 / 36, lambda: take(lambda: full[(k, late)].wait(
                    lambda: sim.tensor(P["s_work"] * 16 / 36, lambda: (
                        rel[(k, 0)].set(), softmax_and_own_pv())))))))
    wg(0, 0)
    wg(1, 1)
    sim.run()
    return _period(done)


BOXES = {"L": range(0, 4), "R": range(4, 9)}  # a page's 64-column boxes: V's left half; the rest


def seesaw(box_barriers=True):
    """Upstream FlashMLA's sm90 dense order (csrc/sm90/decode/dense/splitkv_mla.cuh, read, not
    copied): warpgroup w owns O[:, 256 w : 256 w + 256) and the S and softmax of tile 2 i + w;
    warpgroup 1's softmax takes warpgroup 0's row maxima (it waits for them), and warpgroup 0
    then rescales its P and O by warpgroup 1's correction, so each warpgroup does P V on both
    tiles of the pair, one P from its registers and the other's from shared memory. No producer:
    each half-page (L: columns 0-255, read by warpgroup 0's P V; R: 256-575) is refilled by the
    warpgroup that read it last as soon as its P V is done, box by box (l_first, then l_box per
    box), and S waits per box (box_barriers; else for its whole half) and takes the half that
    was refilled first (warpgroup 0: L; 1: R) first."""
    sim = Sim()
    full = {(b, j): Flag(sim) for b in range(NT) for j in range(9)}

    def refill(b, half):
        if b < NT:
            for n, j in enumerate(BOXES[half]):
                full[(b, j)].set(P["l_first"] + n * P["l_box"])
    for b in (0, 1):
        refill(b, "L")
        refill(b, "R")
    pairs = NT // 2
    max0, max1, p0_shared, o1_issued = ([Flag(sim) for _ in range(pairs)] for _ in range(4))
    done = {}

    def s(b, order, cb):
        """Tile b's S, its boxes in `order`'s halves, as wgmma batches: one per box
        (box_barriers) or one per half. A batch is issued once its boxes have landed and the
        previous batch has completed (one warpgroup's batches run in order on the pipe)."""
        boxes = [j for h in order for j in BOXES[h]]
        batches = [[j] for j in boxes] if box_barriers else [list(BOXES[h]) for h in order]
        landed = set()
        st = dict(idle=True, n=0)

        def start():
            n = st["n"]
            if st["idle"] and n < len(batches) and all(j in landed for j in batches[n]):
                st["idle"], st["n"] = False, n + 1
                sim.tensor(P["s_work"] * len(batches[n]) / 9, finished)

        def finished():
            st["idle"] = True
            cb() if st["n"] == len(batches) else start()

        def arm(m):  # the boxes' full barriers, waited in order
            if m < len(boxes):
                full[(b, boxes[m])].wait(lambda: (landed.add(boxes[m]), start(), arm(m + 1)))
        arm(0)

    def wg0(i):
        if i >= pairs:
            return
        b0, b1 = 2 * i, 2 * i + 1

        def pv_own_done():  # O[:, :256] += P0 V0_L
            max1[i].wait(lambda: (refill(b0 + 2, "L"), sim.at(sim.t + P["p_share"], lambda: (
                p0_shared[i].set(), o1_issued[i].wait(lambda: sim.at(
                    sim.t + P["o_rescale"], lambda: sim.tensor(P["pv_work"], pv_other_done)))))))

        def pv_other_done():  # O[:, :256] += P1 V1_L
            refill(b1 + 2, "L")
            done[b1] = sim.t
            if b0 + 2 < NT:
                s(b0 + 2, "LR", lambda: wg0(i + 1))
        sim.at(sim.t + P["softmax"], lambda: (max0[i].set(), sim.tensor(P["pv_work"], pv_own_done)))

    def wg1(i):
        if i >= pairs:
            return
        b0, b1 = 2 * i, 2 * i + 1

        def pv_own_done():  # O[:, 256:] += P1 V1_R
            refill(b1 + 2, "R")
            p0_shared[i].wait(lambda: (o1_issued[i].set(), sim.tensor(P["pv_work"], pv_other_done)))

        def pv_other_done():  # O[:, 256:] += P0 V0_R
            refill(b0 + 2, "R")
            if b1 + 2 < NT:
                s(b1 + 2, "RL", lambda: wg1(i + 1))
        max0[i].wait(lambda: sim.at(sim.t + P["softmax"], lambda: (max1[i].set(), sim.at(
            sim.t + P["p_share"], lambda: sim.tensor(P["pv_work"], pv_own_done)))))
    s(0, "LR", lambda: wg0(0))
    s(1, "RL", lambda: wg1(0))
    sim.run()
    return _period(done)


def report():
    r = role_split()
    out = [f"role split {r:.0f} cycles per tile"]
    for name, kw in (("P V after the next S", dict(pv_after_s=True)),
                     ("split S", dict(split_s=True))):
        v = role_split(**kw)
        out.append(f"role split, {name}: {v:.0f} ({v / r:.2f}x)")
    for form, chunks in (("A", False), ("B", False), ("A", True), ("B", True), ("C", True)):
        v = ping_pong(form, chunks)
        out.append(f"ping-pong {form}{' + chunks' if chunks else ''}: {v:.0f} ({v / r:.2f}x)")
    for name, box in (("per-box barriers", True), ("per-half barriers", False)):
        v = seesaw(box_barriers=box)
        out.append(f"seesaw (upstream's order), {name}: {v:.0f} ({v / r:.2f}x)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="vary softmax, refill latency, hand-off")
    args = ap.parse_args()
    if not args.sweep:
        print("\n".join(report()))
        return
    base = dict(P)
    for soft in (880, 1100, 1300):
        for lt, lc in ((1000, 700), (1500, 1100), (1800, 1800), (1800, 2500), (2000, 3000)):
            for hand in (150, 300):
                P.update(base, softmax=soft, l_tile=lt, l_chunk=lc, handoff=hand)
                r = role_split()
                print(f"softmax {soft} refill {lt}/{lc} hand-off {hand}: role split {r:.0f}; "
                      f"A {ping_pong('A', False) / r:.2f}x, B {ping_pong('B', False) / r:.2f}x, "
                      f"A + chunks {ping_pong('A', True) / r:.2f}x, "
                      f"C + chunks {ping_pong('C', True) / r:.2f}x")


if __name__ == "__main__":
    main()
