"""Process-wide settings every netfence process applies at start."""

import gc
import sys

# The compiler and renderer build hundreds of thousands of small, acyclic, long-lived objects.
# CPython's default gen-0 threshold (700 allocations) then triggers full collections that walk
# the whole heap again and again: measured as 2/3 of a 10,000-pod compile + render. Collecting
# less often keeps cycle collection (rare here) without that cost.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


# Both daemons hand work between threads (watch readers, the sync loop, HTTP calls run with
# asyncio.to_thread, nft and netlink calls that release the GIL). A thread that waits for the GIL
# while another computes gets it after the switch interval, 5 ms by default: that much added to
# a sync of ~5 ms. bench/scale.py, own-pod events at 10k: p99 15-22 ms at 5 ms, 14-17 at 0.5 ms.
SWITCH_INTERVAL = 0.001


def tune_threads() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)


def freeze_heap() -> None:
    """Once a process has built what it keeps (the controller: the whole cluster compiled and
    published), move every object alive now out of the collector's sight (gc.freeze). Without it
    each full collection walks them all again: a pause of ~0.3 s at 10,000 pods, landing on
    whatever event is being handled. They are still freed by reference counting when dropped."""
    gc.collect()
    gc.freeze()
