"""Where sweep(device="cuda") and sweep(device="cpu") differ, and whether cuda repeats itself.

    python bench/gpu_diag.py [--runs 8] [--steps 100]   # on a GPU machine

Prints, for every output of ``sweep`` (validation loss and each hypergradient), the
largest difference relative to the largest value between the two devices and
between two cuda runs, and each path's time per setting after its JIT warm-up.
The CPU path is a slow per-example loop (7-30 s per setting at T = 100): keep
``--runs`` small.
"""

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from bench.gpu_check import FULL, _logreg_problem  # noqa: E402
from bench.gpu_check import _relative_error as _rel  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    from hypergrad_fast import sweep
    from hypergrad_fast.models import LogisticRegression

    lr = FULL["logreg"]
    runs, steps = args.runs, args.steps
    inputs, targets, batches, x0, alphas, betas, l2 = _logreg_problem(
        runs, lr["n_in"], lr["n_out"], lr["examples"], steps, lr["batch"])
    model = LogisticRegression(lr["n_in"], lr["n_out"])
    split = len(inputs) * 4 // 5
    data = ((inputs[:split], targets[:split]), (inputs[split:], targets[split:]))
    a = np.broadcast_to(np.asarray(alphas, float).reshape(runs, 1), (runs, steps)).copy()
    b = np.broadcast_to(np.asarray(betas, float).reshape(runs, 1), (runs, steps)).copy()
    log_l2 = np.log(np.broadcast_to(np.asarray(l2, float).reshape(runs, 1),
                                    (runs, model.layout.n_groups))).copy()
    kw = dict(batch_size=lr["batch"], log_init_scales=-3.0)
    out = {}
    for device in ("cuda", "cpu"):
        sweep(model, data, a[:1, :2], b[:1, :2], meta=log_l2[:1], device=device, **kw)
        t0 = time.perf_counter()
        out[device] = sweep(model, data, a, b, meta=log_l2, device=device, **kw)
        print(f"{device}: {(time.perf_counter() - t0) / runs:.3f} s per setting", flush=True)
        if device == "cuda":  # the CPU path is slow; its repeatability is tested in CI
            out[device + "2"] = sweep(model, data, a, b, meta=log_l2, device=device, **kw)
    fields = [f for f in out["cpu"]._fields if np.asarray(getattr(out["cpu"], f)).dtype.kind == "f"]
    print(f"{'field':24s} {'cuda vs cpu':>12s} {'cuda repeat':>12s}")
    for f in fields:
        c, g = getattr(out["cpu"], f), getattr(out["cuda"], f)
        print(f"{f:24s} {_rel(g, c):12.3e} {_rel(g, getattr(out['cuda2'], f)):12.3e}")
        if np.ndim(g) == 0:
            continue
        per_run = [_rel(np.asarray(g)[k], np.asarray(c)[k]) for k in range(runs)]
        print(f"{'':24s} per setting: " + " ".join(f"{r:.1e}" for r in per_run))


if __name__ == "__main__":
    main()
