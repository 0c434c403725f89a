"""The garbage collector of a long-running process: settle the heap once start-up is over.

A peer process holds a few hundred thousand objects once torch, hivemind and a model are
loaded, and CPython's full collection walks every one of them: 60-110 ms on this machine (one
server's, measured in bench/swarm_inference.py's run), taken in the middle of whatever the
process is doing, a decoding step at some point of every generation of a few hundred tokens.
Those objects live as long as the process, so once start-up is over `settle()` collects once
and freezes everything that survived (`gc.freeze()`: the permanent generation, never walked
again). Later collections walk only what was made since: a full one then takes 0.4-6 ms.
Frozen objects are still freed by reference counting, but a reference cycle among them is
never collected, so only a process's owner settles (the CLI's long-running verbs, once ready;
a server again after it loads another span): a library never does it behind its caller's back.
"""

from __future__ import annotations

import gc

from prometheus_client import Gauge

FROZEN = Gauge("swarmlm_heap_frozen_objects", "objects the process froze once start-up was over (heap.py)")


def settle() -> int:
    """Collect what start-up left behind, then freeze the survivors; the number of objects frozen in all."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    FROZEN.set(n)
    return n
