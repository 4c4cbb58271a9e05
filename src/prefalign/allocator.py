"""Keep freed tensor memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults, blocks above a
dynamic threshold (128 KiB, growing to at most 32 MiB) are served by ``mmap`` and unmapped on free,
and the top of the heap is trimmed as soon as 128 KiB of it are free. A diffusion sampler allocates
and frees the same activation-sized tensors at every step, so each step maps fresh pages and takes
a page fault on every 4 KiB of them: a 10-step ``prefs make`` on the shapes model spent 16 % of its
wall time in the kernel (11.7 M minor faults for 192 images), all of it gone with the settings below
(``benchmarks/allocator.py``).

:func:`keep_freed_memory` sets, through ``mallopt``:

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks under it come from the heap, and setting
  it stops the threshold from moving;
- ``M_TRIM_THRESHOLD`` = 2 GiB (``mallopt`` takes an ``int``) and ``M_TOP_PAD`` = 1 GiB: the heap top
  is trimmed only when 2 GiB of it are free, and grows in 1 GiB steps of address space, not a page at
  a time.

The price is that the resident set stays at its high-water mark instead of shrinking after a peak
(the peak itself is unchanged). The command line calls this at start; set
``PREFALIGN_MALLOC=default`` to keep glibc's behaviour. It does nothing off glibc (macOS, Windows,
musl) and when the environment already sets ``MALLOC_*`` tunables (the user's choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1
TOP_PAD_BYTES = 1024**3


def _user_chose() -> bool:
    if os.environ.get("PREFALIGN_MALLOC", "").lower() == "default":
        return True
    return any(key.startswith("MALLOC_") for key in os.environ) or "GLIBC_TUNABLES" in os.environ


def keep_freed_memory() -> bool:
    """Apply the settings above; returns whether they were applied."""
    if not sys.platform.startswith("linux") or _user_chose():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TOP_PAD, TOP_PAD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
