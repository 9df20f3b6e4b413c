"""Test-session setup that must happen before any module imports triton.

Triton decides between its interpreter and its compiler when it is first imported, and torch or
Lightning may import it early. The suite runs Triton kernels in the interpreter on CPU tensors, so the
flag is set here, first. (Set TRITON_INTERPRET=0 to opt out, e.g. to keep Triton compiled on a GPU box.)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # One intra-op thread per worker and per process it starts: `-n 2` on 2 cores already keeps both busy,
    # and OpenMP threads spinning for a descheduled peer made each forward of the tests' tiny models take
    # ~0.6 s instead of ~0.01 s on a loaded machine. torch reads this when it is first imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list) -> None:
    """The rehearsals first, then the other end-to-end runs, then the rest: ``-n 2`` hands tests out in
    this order, and a rehearsal of minutes drawn last ran alone on one core while the other idled (330 s
    of a 2011 s run). The sort is stable and the same in every worker, as xdist requires."""

    def rank(item) -> int:
        if item.path.name == "test_rehearsal.py":
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
