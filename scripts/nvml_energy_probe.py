"""How often NVML's energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ) moves on this GPU:
polls it for a few seconds and prints the intervals between changes and the power they imply.
The side-by-side's energy per call (benchmarks/sbs_common.gpu_energy_counter) is the counter's
difference over each in-one-unit window, so its error is about one update interval's energy; the
printout says which windows are long enough (ENERGY_COUNTER_MIN_S).

  python3 scripts/nvml_energy_probe.py [seconds]
"""
import statistics
import sys
import time

import pynvml


def main(seconds: float = 3.0) -> None:
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    print("device:", pynvml.nvmlDeviceGetName(h))
    reads, changes = 0, []  # (time, value) at each change
    last = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        v = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        reads += 1
        if v != last:
            changes.append((time.perf_counter(), v))
            last = v
    print(f"{reads} reads in {seconds:.1f} s ({seconds / max(reads, 1) * 1e6:.1f} us per read), "
          f"{len(changes)} changes")
    if len(changes) < 3:
        print("the counter barely moved: cannot say its update interval")
        return
    dt = [b[0] - a[0] for a, b in zip(changes, changes[1:])]
    de = [b[1] - a[1] for a, b in zip(changes, changes[1:])]
    watts = (changes[-1][1] - changes[0][1]) / 1e3 / (changes[-1][0] - changes[0][0])
    print(f"interval between changes: median {statistics.median(dt) * 1e3:.2f} ms, "
          f"min {min(dt) * 1e3:.2f}, max {max(dt) * 1e3:.2f}; step median {statistics.median(de)} mJ; "
          f"mean power over the changes {watts:.1f} W; "
          f"power.draw now {pynvml.nvmlDeviceGetPowerUsage(h) / 1e3:.1f} W")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
