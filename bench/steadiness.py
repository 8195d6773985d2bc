"""How steady this machine's CPU is: the same pure-Python chunk of work, timed again
and again, alone.

On a shared virtual machine the speed of one core changes from moment to moment: other
tenants' work slows ours down in bursts that no counter inside the machine shows (no
steal time, no gap in a busy loop; the loop just runs slower). A burst of 100 ms at a
fifth of the speed is invisible in a throughput figure and decides a p99. This probe
says how large those bursts were when the bench ran, so that a latency figure can be
read against them.

    python bench/steadiness.py [SECONDS]
"""

from __future__ import annotations

import sys
import time
from typing import Any

STEPS = 20_000  # one chunk: about 1.5 ms on this machine at its fastest


def _chunk() -> float:
    started = time.perf_counter()
    total = 0
    for step in range(STEPS):
        total += step
    return time.perf_counter() - started


def measure(seconds: float = 5.0) -> dict[str, Any]:
    """Time chunks for `seconds`: their fastest, median, p99 and slowest in ms, and the
    share of the time spent in chunks that took more than twice the fastest."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times.append(_chunk())
    ordered = sorted(times)
    fastest = ordered[0]
    slow = sum(t for t in times if t > 2 * fastest)
    return {
        "seconds": seconds,
        "chunks": len(times),
        "fastest_ms": round(fastest * 1e3, 3),
        "p50_ms": round(ordered[len(ordered) // 2] * 1e3, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "slow_time_share": round(slow / sum(times), 4),
    }


def describe(probe: dict[str, Any]) -> str:
    return (
        f"the same chunk of Python took {probe['fastest_ms']:.2f} ms at best, "
        f"{probe['p50_ms']:.2f} ms at the median, {probe['p99_ms']:.2f} ms at p99 and "
        f"{probe['max_ms']:.2f} ms at worst; {probe['slow_time_share']:.0%} of the time "
        "went to chunks slower than twice the best"
    )


if __name__ == "__main__":
    print(describe(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)))
