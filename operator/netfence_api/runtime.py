"""Process-wide settings every netfence process applies at start."""

import gc

# The compiler and renderer build hundreds of thousands of small, acyclic, long-lived objects.
# CPython's default gen-0 threshold (700 allocations) then triggers full collections that walk
# the whole heap again and again: measured as 2/3 of a 10,000-pod compile + render. Collecting
# less often keeps cycle collection (rare here) without that cost.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
