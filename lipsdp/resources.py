"""How much memory this process may use: the budget the solve stage plans against."""

from __future__ import annotations

from lipsdp.budget import current


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
