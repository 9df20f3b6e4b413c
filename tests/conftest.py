"""Test-session setup that must happen before any module imports triton.

Triton decides between its interpreter and its compiler when it is first imported, and torch or
Lightning may import it early. The suite runs Triton kernels in the interpreter on CPU tensors, so the
flag is set here, first. (Set TRITON_INTERPRET=0 to opt out, e.g. to keep Triton compiled on a GPU box.)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
