"""The worker's startup heap and Python's cycle collector: what a run need not have rescanned.

A task process has imported Airflow, SQLAlchemy, the database drivers, numpy and pyarrow before its
run starts: hundreds of thousands of long-lived objects (modules, classes, functions, configuration)
in the collector's oldest generation. The first full collection that the run's own allocations
trigger then walks every one of them, for nothing (they are module state, not garbage): about 0.1 s
of one core in the benchmark's worker, in the middle of the run's set-up (issue 13's fifth profile).

:func:`freeze_startup_heap` moves them out of the collector's reach (:func:`gc.freeze`, as Airflow's
LocalExecutor does before it forks its workers), once per process: objects made afterwards (every
run's, a long-lived process's later ones) stay collectable as before, so at most what the process
held at its first run is kept for good, and a young-generation collection first frees the short-lived
garbage of start-up (cheap: it does not walk the old objects).
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_startup_heap() -> bool:
    """Freeze what the process holds now, the first time it is called (later calls do nothing); whether it froze.

    Nothing happens when the collector is disabled (the process manages it itself)."""
    global _frozen
    with _lock:
        if _frozen or not gc.isenabled():
            return False
        gc.collect(1)
        gc.freeze()
        _frozen = True
        return True
