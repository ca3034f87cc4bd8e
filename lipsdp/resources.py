"""How much memory this process may use: the budget the solve stage plans against."""

from __future__ import annotations

import ctypes

from lipsdp.budget import current

#: Freed blocks up to this size stay with the C allocator for reuse (:func:`keep_freed_memory`).
REUSE_BYTES = 2**30
#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def available_memory() -> int:
    """Bytes of memory available to this process, best effort.

    The smallest of the cgroup limit (containers, CI runners: exceeding it kills
    the process without a Python error) and the kernel's ``MemAvailable``; 8 GiB
    where neither can be read.  Within a run that has a memory limit (:mod:`lipsdp.budget`), also what
    the run may still add, so every plan made against this figure (the LMI's assembly, the solve)
    respects ``--memory-limit``.
    """
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit():
                limits.append(int(text))
        except OSError:
            pass
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        limits.append(info.get("MemAvailable", info.get("MemTotal")))
    except (OSError, ValueError, IndexError):
        pass
    budget = current()
    left = None if budget is None else budget.memory_left()
    if left is not None:
        limits.append(max(left, 0))
    return min(limits) if limits else 8 * 2 ** 30


def keep_freed_memory() -> bool:
    """Have the C allocator keep freed blocks of up to :data:`REUSE_BYTES` for reuse; whether it took effect.

    glibc serves large blocks (numpy's temporaries: Gram matrices, im2col buffers, Schur blocks) by ``mmap``
    and returns them with ``munmap`` when freed, so the next array of that size starts on fresh pages and
    every first write to a page is a page fault.  On virtual machines a fault costs tens of microseconds:
    the sampled lower bound of a 16-channel CNN spent three times its arithmetic in the kernel.  Raising the
    mmap and trim thresholds (``mallopt``) makes freed memory come back to the next allocation instead.
    The command line calls it for its own process when no ``--memory-limit`` is set: memory kept this way
    still counts in the resident size that a memory limit watches.  Not glibc (no ``mallopt``): False.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(ctypes.c_int(param), ctypes.c_int(REUSE_BYTES)) == 1
               for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
