"""A/B of the structured interior point (``lipsdp.conv_ipm``) on one trained CNN, in one process.

The chain is read once from ``--model`` (a ``.pt`` of ``benchmarks/bench_trained_cnn.py``, 1x28x28 input)
and solved by this tree's ``lipsdp.conv_ipm`` and by the ``conv_ipm.py`` files given with ``--other``
(e.g. ``git show BASE:lipsdp/conv_ipm.py > /tmp/conv_ipm_old.py``), in the order given, then verified by
``lipsdp.conv_lmi.verify_chain``.  Printed per side: CPU and wall seconds of the solve, iterations (how many
factored in single precision), the stopping message, the verified bound and the load average, so that runs
on a shared machine can be read by their CPU seconds.  Run with ``OMP_NUM_THREADS=1`` (and its siblings)
to compare one-thread work.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--other", action="append", default=[], help="a conv_ipm.py to compare (repeatable)")
    parser.add_argument("--order", default="new,other", help="comma-separated: new, other0, other1, ...")
    args = parser.parse_args()

    from lipsdp import conv_ipm, conv_lmi
    from lipsdp.convnet import conv_chain
    from lipsdp.pipeline import load_model

    net, _ = load_model(args.model, input_shape=(1, 28, 28), trust_pickle=True)
    chain = conv_chain(net)
    blocks = [conv_lmi.layer_blocks(layer) for layer in chain.layers]
    modules = {"new": conv_ipm}
    for k, path in enumerate(args.other):
        spec = importlib.util.spec_from_file_location(f"lipsdp.conv_ipm_other{k}", path)
        modules[f"other{k}"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[f"other{k}"])
    modules.setdefault("other", modules.get("other0"))
    for which in args.order.split(","):
        if modules.get(which) is None:
            continue
        conv_lmi.conv_ipm = modules[which]
        c0, w0 = time.process_time(), time.perf_counter()
        sol = conv_lmi.solve_chain(chain, blocks)
        c1, w1 = time.process_time(), time.perf_counter()
        res = conv_lmi.verify_chain(chain, blocks, sol)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[0]
        print(f"[{which}] solve {c1 - c0:.1f} CPU s {w1 - w0:.1f} s wall, {sol['iterations']} iterations "
              f"({sol.get('single_factors', 0)} single), {sol['message']}; verified {res.verified} "
              f"bound {res.bound!r} ({res.message}); "
              f"peak RSS so far {rss:.2f} GiB; load {load}", flush=True)


if __name__ == "__main__":
    main()
