"""Check and time the batched GPU engine on a real GPU; prints one table.

    python bench/gpu_check.py            # on a machine with a CUDA GPU, < 5 minutes
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu_check.py --tiny   # code paths only, no GPU
    python bench/gpu_check.py --cpu-only # the CPU baseline of (c) alone

(a) Bit identity: B=64 runs of N=10,000 parameters, 20 steps forward and 20 back
    with position-dependent gradients and scalar / per-run / per-parameter alphas
    and betas; the GPU state (x, v, coder, height, words) is compared with 64 CPU
    engines after every step.
(b) Throughput of the step kernels at B * N = 1e8, as bytes moved / kernel time
    (CUDA events), against the theoretical bandwidth
    ``2 * MEMORY_CLOCK_RATE * GLOBAL_MEMORY_BUS_WIDTH / 8`` (the device attributes:
    clock in kHz, width in bits, double data rate) and against a measured
    device-to-device copy.  Bytes counted per element are the compulsory ones:
    8-byte loads and stores of x, v, coder and g; the rare stack traffic (height
    and one word, on about log2(d/n)/16 of the elements a step) and the per-run
    coefficients are not counted.
(c) Logistic regression (784 inputs, 10 classes, synthetic data, batches of 100),
    B=256 hyperparameter settings (alpha, beta, L2 per run), T=100 steps trained
    and reversed to the exact starting point: on the GPU, batched, with the
    gradient computed on the device by the numba.cuda kernels below; and on the
    CPU, one setting after another with the CPU engine and a NumPy gradient.
(d) The same B=256 settings through ``hypergrad_fast.sweep``: value and all
    hypergradients (learning rates, momenta, init scales, L2) with
    ``device="cuda"`` for the whole batch, against ``device="cpu"`` run one
    setting at a time (a few settings timed, scaled up to B).

Exit status: 0 when every check passed, 1 when one failed, 2 without a GPU.
Nothing here is named ``time_*`` or ``track_*``: asv would take it for a benchmark.
"""

import argparse
import math
import sys
import time

import numpy as np
from numba import cuda

from hypergrad_fast.engine import ReversibleMomentum

# asv imports every module under bench/ to discover benchmarks, also when it measures an
# old commit that has no GPU engine: import that only when the script runs.
BatchedReversibleMomentum = _why_no_gpu = gpu_available = None


def _import_gpu_engine():
    global BatchedReversibleMomentum, _why_no_gpu, gpu_available
    from hypergrad_fast.engine import gpu as gpu_engine
    BatchedReversibleMomentum = gpu_engine.BatchedReversibleMomentum
    _why_no_gpu, gpu_available = gpu_engine._why_no_gpu, gpu_engine.gpu_available

#: Compulsory bytes moved per element by each kernel (see the module docstring).
KERNEL_BYTES = {
    "step": 4 * 8 + 3 * 8,  # load x, v, coder, g; store x, v, coder
    "position": 2 * 8 + 8,  # load x, v; store x
    "undecay": 3 * 8 + 2 * 8,  # load v, coder, g; store v, coder
    "decay": 3 * 8 + 2 * 8,
}

FULL = dict(identity=(64, 10_000, 20), total=10**8, runs=1000, reps=10,
            logreg=dict(runs=256, steps=100, n_in=784, n_out=10, batch=100, examples=5000))
TINY = dict(identity=(3, 40, 4), total=2_000, runs=4, reps=2,
            logreg=dict(runs=4, steps=5, n_in=20, n_out=3, batch=8, examples=50))


# ----------------------------------------------------------------------------- helpers
class _Timer:
    """Elapsed device time in ms: CUDA events on a GPU, a synchronised wall clock otherwise."""

    def __init__(self):
        self._events = not cuda.config.ENABLE_CUDASIM

    def __enter__(self):
        if self._events:
            self._start, self._end = cuda.event(), cuda.event()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._events:
            self._end.record()
            self._end.synchronize()
            self.ms = cuda.event_elapsed_time(self._start, self._end)
        else:
            cuda.synchronize()
            self.ms = 1e3 * (time.perf_counter() - self._t0)


def _peak_bandwidth():
    """(bytes/s, description) from the device attributes, or (None, why not)."""
    try:
        dev = cuda.get_current_device()
        clock_khz = int(dev.MEMORY_CLOCK_RATE)
        width_bits = int(dev.GLOBAL_MEMORY_BUS_WIDTH)
    except Exception as exc:
        return None, f"memory clock / bus width unavailable ({type(exc).__name__})"
    peak = 2.0 * clock_khz * 1e3 * width_bits / 8
    return peak, (f"2 x MEMORY_CLOCK_RATE {clock_khz / 1e3:.0f} MHz x GLOBAL_MEMORY_BUS_WIDTH "
                  f"{width_bits} bit / 8 = {peak / 1e9:.0f} GB/s")


def _row_of(coef, b):
    coef = np.asarray(coef)
    return coef.item() if coef.ndim == 0 else coef[b]


@cuda.jit
def _pseudo_random(out, seed):
    """Reproducible values in [-1, 1] made on the device (no host copy of 1e8 numbers)."""
    j = cuda.grid(1)
    if j < out.shape[0]:
        out[j] = math.sin(np.float64(j) * 0.7548776662466927 + seed * 1.324717957244746)


def _device_random(shape, seed):
    out = cuda.device_array(shape, dtype=np.float64)
    n = int(np.prod(shape))
    _pseudo_random[-(-n // 256), 256](out.reshape(n), float(seed))
    return out


# ----------------------------------------------------------------------------- (a)
def check_identity(runs, n, steps, seed=0):
    """GPU against CPU engines, state compared after every step; returns (ok, note)."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((runs, n))
    gpu = BatchedReversibleMomentum(x0)
    cpus = [ReversibleMomentum(x0[b]) for b in range(runs)]
    layouts = [lambda: 0.3, lambda: rng.uniform(0.05, 0.5, runs),
               lambda: rng.uniform(0.05, 0.5, (runs, n))]
    beta_layouts = [lambda: rng.uniform(0.5, 0.99, runs), lambda: 0.9,
                    lambda: rng.uniform(1e-4, 1.0, (runs, n)), lambda: 1e-3]
    alphas = [layouts[t % 3]() for t in range(steps)]
    betas = [beta_layouts[t % 4]() for t in range(steps)]

    def compare(when):
        s = gpu.state
        for b, cpu in enumerate(cpus):
            c = cpu.state
            for field in ("x", "v", "coder", "height"):
                if not np.array_equal(getattr(s, field)[b], getattr(c, field)):
                    return f"{field} of run {b} differs {when}"
            if not np.array_equal(s.words[:c.words.shape[0], b], c.words):
                return f"words of run {b} differ {when}"
        return None

    gs = []
    for t in range(steps):
        g = np.sin(3.0 * gpu.x + t) + 0.5 * gpu.x
        gs.append(g)
        gpu.step(g, alphas[t], betas[t])
        for b, cpu in enumerate(cpus):
            cpu.step(g[b], _row_of(alphas[t], b), _row_of(betas[t], b))
        bad = compare(f"after forward step {t}")
        if bad:
            return False, bad
    rows = gpu.state.words.shape[0]
    for t in reversed(range(steps)):
        gpu.unstep_position(alphas[t])
        gpu.unstep_velocity(gs[t], betas[t])
        for b, cpu in enumerate(cpus):
            cpu.unstep_position(_row_of(alphas[t], b))
            cpu.unstep_velocity(gs[t][b], _row_of(betas[t], b))
        bad = compare(f"after reverse step {t}")
        if bad:
            return False, bad
    start = BatchedReversibleMomentum(x0).state
    back = all(np.array_equal(getattr(gpu.state, f), getattr(start, f))
               for f in ("x", "v", "coder", "height"))
    if not back:
        return False, "the reverse pass did not return to the first state"
    return True, f"{steps} steps each way, up to {rows} words deep; back to x0 exactly"


# ----------------------------------------------------------------------------- (b)
def measure_throughput(total, runs, reps):
    """Kernel times and bandwidth fractions at B * N = total; returns table rows."""
    n = total // runs
    x0 = _device_random((runs, n), 1)
    g = _device_random((runs, n), 2)
    eng = BatchedReversibleMomentum(x0)
    del x0
    betas = np.linspace(0.5, 0.99, runs)
    eng.reserve(2 * (reps + 1), betas)
    g_flat = eng._gradient(g)
    alpha_args = eng._alpha_args(np.linspace(0.01, 0.1, runs))
    beta_args = eng._beta_args(betas)
    peak, peak_note = _peak_bandwidth()

    # a device-to-device copy of the same size as x, v and coder together
    src = cuda.device_array(3 * runs * n, dtype=np.int64)
    dst = cuda.device_array_like(src)
    dst.copy_to_device(src)
    with _Timer() as tc:
        dst.copy_to_device(src)
    copy_bw = 2 * src.nbytes / (tc.ms * 1e-3)
    del src, dst

    times = {k: [] for k in KERNEL_BYTES}
    for rep in range(reps + 1):  # the first round compiles and warms up, untimed
        for name, run in (("step", lambda: eng._forward(g_flat, alpha_args, beta_args, False)),
                          ("position", lambda: eng._position(alpha_args, -1, False)),
                          ("undecay", lambda: eng._undecay(g_flat, beta_args, False)),
                          ("decay", lambda: eng._forward(g_flat, None, beta_args, False)),
                          ("undecay", lambda: eng._undecay(g_flat, beta_args, False))):
            with _Timer() as tk:
                run()
            if rep:
                times[name].append(tk.ms)
        if eng._read_flags() >= 0:
            raise RuntimeError("a kernel refused an element while timing")

    rows = [("(b) copy d2d", f"{3 * total * 8 / 1e9:.1f} GB", f"{copy_bw / 1e9:.0f} GB/s",
             "reference: bytes read + written" + (f", {copy_bw / peak:.0%} of peak" if peak
                                                  else ""))]
    for name, nbytes in KERNEL_BYTES.items():
        ms = float(np.median(times[name]))
        bw = total * nbytes / (ms * 1e-3)
        frac = f"{bw / peak:.0%} of peak, " if peak else ""
        rows.append((f"(b) {name} kernel", f"B*N={total:.0e}, {nbytes} B/elem",
                     f"{ms:.3f} ms, {bw / 1e9:.0f} GB/s",
                     f"{frac}{bw / copy_bw:.0%} of copy"))

    # the public call: validation, coefficient upload, launch, 16-byte readback
    g_host_free = g  # a device array: no host copy per step
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        eng.step(g_host_free, 0.05, betas)
        t1 = time.perf_counter()
        eng.unstep_position(0.05)
        eng.unstep_velocity(g_host_free, betas)
        if rep:
            times.setdefault("api", []).append(1e3 * (t1 - t0))
    api_ms = float(np.median(times["api"]))
    rows.append(("(b) engine.step() call", f"B*N={total:.0e}", f"{api_ms:.3f} ms",
                 f"kernel {np.median(times['step']):.3f} ms + host/readback"))
    rows.append(("(b) peak bandwidth", "", f"{peak / 1e9:.0f} GB/s" if peak else "n/a",
                 peak_note))
    return rows


# ----------------------------------------------------------------------------- (c)
def _logreg_problem(runs, n_in, n_out, examples, steps, batch, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(0.0, 1.0, (examples, n_in))
    teacher = rng.standard_normal((n_in, n_out))
    labels = np.argmax(inputs @ teacher + rng.gumbel(size=(examples, n_out)), axis=1)
    targets = np.eye(n_out)[labels]
    batches = np.array([rng.choice(examples, batch, replace=False) for _ in range(steps)])
    n = n_in * n_out + n_out
    x0 = np.tile(0.01 * rng.standard_normal(n), (runs, 1))
    alphas = np.exp(rng.uniform(np.log(0.01), np.log(1.0), runs))
    betas = rng.uniform(0.5, 0.99, runs)
    l2 = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1), runs))
    return inputs, targets, batches, x0, alphas, betas, l2


def _numpy_gradient(w, inputs, targets, idx, l2, n_in, n_out):
    """Mean softmax cross-entropy gradient plus L2 on the weights, one run."""
    weights = w[:n_in * n_out].reshape(n_in, n_out)
    xb = inputs[idx]
    z = xb @ weights + w[n_in * n_out:]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    r = p - targets[idx]
    return np.concatenate([(xb.T @ r).ravel() / len(idx) + l2 * weights.ravel(),
                           r.sum(axis=0) / len(idx)])


@cuda.jit
def _logits(x, inputs, idx, z, n_in, n_out):
    """z[b, e, c] = inputs[idx[e]] . W_b[:, c] + bias_b[c]."""
    t = cuda.grid(1)
    runs, batch = x.shape[0], idx.shape[0]
    if t >= runs * batch * n_out:
        return
    b = t // (batch * n_out)
    e = (t // n_out) % batch
    c = t % n_out
    row = idx[e]
    acc = x[b, n_in * n_out + c]
    for d in range(n_in):
        acc += inputs[row, d] * x[b, d * n_out + c]
    z[b, e, c] = acc


@cuda.jit
def _residual(z, targets, idx):
    """z[b, e, :] <- softmax(z[b, e, :]) - targets[idx[e], :]."""
    t = cuda.grid(1)
    runs, batch, n_out = z.shape
    if t >= runs * batch:
        return
    b, e = t // batch, t % batch
    m = z[b, e, 0]
    for c in range(1, n_out):
        m = max(m, z[b, e, c])
    s = 0.0
    for c in range(n_out):
        s += math.exp(z[b, e, c] - m)
    for c in range(n_out):
        z[b, e, c] = math.exp(z[b, e, c] - m) / s - targets[idx[e], c]


@cuda.jit
def _weight_gradient(x, inputs, idx, r, l2, g, n_in, n_out):
    """g[b] = inputs[idx]^T r[b] / batch + l2[b] W_b, and the bias part."""
    t = cuda.grid(1)
    runs, n = x.shape
    if t >= runs * n:
        return
    b, k = t // n, t % n
    batch = idx.shape[0]
    acc = 0.0
    if k < n_in * n_out:
        d, c = k // n_out, k % n_out
        for e in range(batch):
            acc += inputs[idx[e], d] * r[b, e, c]
        g[b, k] = acc / batch + l2[b] * x[b, k]
    else:
        c = k - n_in * n_out
        for e in range(batch):
            acc += r[b, e, c]
        g[b, k] = acc / batch


def _launch(kernel, threads, *args):
    kernel[-(-threads // 256), 256](*args)


def logreg_gpu(problem, n_in, n_out, steps):
    """Train and reverse all runs at once on the GPU; returns (seconds, exact)."""
    inputs, targets, batches, x0, alphas, betas, l2 = problem
    runs, n = x0.shape
    d_inputs, d_targets = cuda.to_device(inputs), cuda.to_device(targets)
    d_batches, d_l2 = cuda.to_device(batches), cuda.to_device(l2)
    x = cuda.device_array((runs, n))
    g = cuda.device_array((runs, n))
    z = cuda.device_array((runs, batches.shape[1], n_out))

    def gradient(eng, t):
        eng.x_device(x)
        idx = d_batches[t]
        _launch(_logits, z.size, x, d_inputs, idx, z, n_in, n_out)
        _launch(_residual, runs * idx.shape[0], z, d_targets, idx)
        _launch(_weight_gradient, runs * n, x, d_inputs, idx, z, d_l2, g, n_in, n_out)
        return g

    def run(t_steps):
        eng = BatchedReversibleMomentum(x0)
        start = eng.state
        eng.reserve(t_steps, betas)
        for t in range(t_steps):
            eng.step(gradient(eng, t), alphas, betas)
        for t in reversed(range(t_steps)):
            eng.unstep_position(alphas)
            eng.unstep_velocity(gradient(eng, t), betas)
        end = eng.state
        return all(np.array_equal(getattr(start, f), getattr(end, f)) for f in start._fields)

    run(1)  # compile
    cuda.synchronize()
    t0 = time.perf_counter()
    exact = run(steps)
    cuda.synchronize()
    return time.perf_counter() - t0, exact


def logreg_cpu(problem, n_in, n_out, steps, max_runs=None):
    """Train and reverse the runs one after another on the CPU engine; (seconds, exact, runs)."""
    inputs, targets, batches, x0, alphas, betas, l2 = problem
    runs = x0.shape[0] if max_runs is None else min(max_runs, x0.shape[0])
    ReversibleMomentum(x0[0]).step(np.zeros(x0.shape[1]), 0.1, 0.5)  # compile
    exact = True
    t0 = time.perf_counter()
    for b in range(runs):
        eng = ReversibleMomentum(x0[b])
        start = eng.state
        eng.reserve(steps, betas[b])
        for t in range(steps):
            eng.step(_numpy_gradient(eng.x, inputs, targets, batches[t], l2[b], n_in, n_out),
                     alphas[b], betas[b])
        for t in reversed(range(steps)):
            eng.unstep_position(alphas[b])
            eng.unstep_velocity(
                _numpy_gradient(eng.x, inputs, targets, batches[t], l2[b], n_in, n_out), betas[b])
        end = eng.state
        exact &= all(np.array_equal(getattr(start, f), getattr(end, f)) for f in start._fields)
    return time.perf_counter() - t0, exact, runs


def _relative_error(actual, desired):
    """Largest difference relative to the largest value: rounding gives ~1e-15 here.

    (Element by element, a hypergradient that is nearly zero can differ by more in
    relative terms; the GPU's FMA contraction and exp() move the last bits.)
    """
    actual, desired = np.asarray(actual, float), np.asarray(desired, float)
    return float(np.abs(actual - desired).max() / max(np.abs(desired).max(), 1e-300))


def sweep_times(problem, n_in, n_out, steps):
    """(gpu seconds, cpu seconds, worst cuda-vs-cpu difference over the stable settings,
    number of stable settings, number left out) for all settings through ``sweep``."""
    from hypergrad_fast import sweep
    from hypergrad_fast.models import LogisticRegression

    inputs, targets, batches, x0, alphas, betas, l2 = problem
    runs = x0.shape[0]
    model = LogisticRegression(n_in, n_out)
    split = len(inputs) * 4 // 5
    data = ((inputs[:split], targets[:split]), (inputs[split:], targets[split:]))
    a = np.broadcast_to(np.asarray(alphas, dtype=float).reshape(runs, 1), (runs, steps))
    b = np.broadcast_to(np.asarray(betas, dtype=float).reshape(runs, 1), (runs, steps))
    log_l2 = np.log(np.broadcast_to(np.asarray(l2, dtype=float).reshape(runs, 1),
                                    (runs, model.layout.n_groups)))
    kw = dict(batch_size=batches.shape[1])
    sweep(model, data, a[:2, :1], b[:2, :1], -3.0, log_l2[:2], device="cuda", **kw)  # compile
    cuda.synchronize()
    t0 = time.perf_counter()
    gpu = sweep(model, data, a, b, -3.0, log_l2, device="cuda", **kw)
    cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    sweep(model, data, a[:2, :1], b[:2, :1], -3.0, log_l2[:2], device="cpu", **kw)  # compile
    t0 = time.perf_counter()
    cpu = sweep(model, data, a, b, -3.0, log_l2, device="cpu", **kw)
    cpu_s = time.perf_counter() - t0
    # A setting in the chaotic regime amplifies any rounding difference (the GPU's FMAs
    # and exp()), so no two implementations agree on it: compare only settings whose CPU
    # result stays put when x0 moves by one ulp (the log init scale by 4.4e-16).
    moved = sweep(model, data, a, b, np.nextafter(-3.0, 0.0), log_l2, device="cpu", **kw)
    stable = [k for k in range(runs)
              if all(_relative_error(getattr(moved, f)[k], getattr(cpu, f)[k]) < 1e-10
                     for f in SWEEP_FIELDS)]
    worst = max((_relative_error(getattr(gpu, f)[k], getattr(cpu, f)[k])
                 for k in stable for f in SWEEP_FIELDS), default=0.0)
    return gpu_s, cpu_s, worst, len(stable), runs - len(stable)


SWEEP_FIELDS = ("valid_loss", "d_alphas", "d_betas", "d_log_init_scales", "d_meta")


# ----------------------------------------------------------------------------- main
def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes: exercises the code paths (e.g. in the simulator)")
    parser.add_argument("--cpu-only", action="store_true",
                        help="run only the CPU baseline of (c); needs no GPU")
    parser.add_argument("--cpu-runs", type=int, default=None,
                        help="time only this many CPU runs in (c) and scale up")
    args = parser.parse_args(argv)
    _import_gpu_engine()
    sizes = TINY if args.tiny else FULL
    lr = sizes["logreg"]
    problem = _logreg_problem(lr["runs"], lr["n_in"], lr["n_out"], lr["examples"],
                              lr["steps"], lr["batch"])
    header = ("check", "setting", "result", "notes")
    n_params = lr["n_in"] * lr["n_out"] + lr["n_out"]
    setting_c = f"B={lr['runs']} settings, T={lr['steps']}, N={n_params}, batch {lr['batch']}"

    if args.cpu_only:
        cpu_s, cpu_exact, done = logreg_cpu(problem, lr["n_in"], lr["n_out"], lr["steps"],
                                            args.cpu_runs)
        total = cpu_s * lr["runs"] / done
        print(_table([header, ("(c) logreg CPU, one by one", setting_c, f"{total:.2f} s",
                               f"{done} runs timed; back to x0 exactly: {cpu_exact}")]))
        return 0 if cpu_exact else 1

    if not gpu_available():
        print(f"gpu_check.py needs a CUDA GPU, and none is usable here: {_why_no_gpu()}.\n"
              "Run it on a machine with a GPU; 'NUMBA_ENABLE_CUDASIM=1 python "
              "bench/gpu_check.py --tiny' runs the code paths on the CPU, and --cpu-only "
              "the CPU baseline alone.", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    rows = [header, ("device", "", name, "numba-cuda, no fastmath")]
    failed = False

    runs, n, steps = sizes["identity"]
    ok, note = check_identity(runs, n, steps)
    failed |= not ok
    rows.append(("(a) bit identity vs CPU", f"B={runs}, N={n}", "PASS" if ok else "FAIL", note))

    rows += measure_throughput(sizes["total"], sizes["runs"], sizes["reps"])

    gpu_s, gpu_exact = logreg_gpu(problem, lr["n_in"], lr["n_out"], lr["steps"])
    cpu_s, cpu_exact, done = logreg_cpu(problem, lr["n_in"], lr["n_out"], lr["steps"],
                                        args.cpu_runs)
    cpu_total = cpu_s * lr["runs"] / done
    failed |= not (gpu_exact and cpu_exact)
    rows.append(("(c) logreg GPU, batched", setting_c, f"{gpu_s:.2f} s",
                 f"train + reverse; back to x0 exactly: {gpu_exact}"))
    rows.append(("(c) logreg CPU, one by one", setting_c, f"{cpu_total:.2f} s",
                 f"{done} runs timed" + ("" if done == lr["runs"] else ", scaled up")
                 + f"; back to x0 exactly: {cpu_exact}"))
    rows.append(("(c) speed-up", "", f"{cpu_total / gpu_s:.1f}x", "CPU time / GPU time"))

    sw_gpu, sw_cpu, sw_worst, sw_stable, sw_left = sweep_times(problem, lr["n_in"], lr["n_out"],
                                                               lr["steps"])
    sw_agree = sw_worst < 1e-10
    failed |= not sw_agree
    rows.append(("(d) sweep hypergradients GPU", setting_c, f"{sw_gpu:.2f} s",
                 "device='cuda', whole batch"))
    rows.append(("(d) sweep hypergradients CPU", setting_c, f"{sw_cpu:.2f} s",
                 "device='cpu', whole batch (compiled objective, all cores)"))
    rows.append(("(d) cuda vs cpu", f"{sw_stable} stable settings",
                 "PASS" if sw_agree else "FAIL",
                 f"largest difference {sw_worst:.1e} of a field's largest value (< 1e-10); "
                 f"{sw_left} settings left out: their CPU result moves by > 1e-10 when x0 "
                 "moves by one ulp (chaotic regime)"))
    rows.append(("(d) speed-up", "", f"{sw_cpu / sw_gpu:.1f}x", "CPU time / GPU time"))

    # the PTX of the step kernels must hold no contracted multiply-add (see _gpu_kernels)
    if not cuda.config.ENABLE_CUDASIM:
        from hypergrad_fast.engine import _gpu_kernels as gk
        fma = sum(ptx.count("fma.rn.f64") for k in (gk.step, gk.decay, gk.position, gk.undecay)
                  for ptx in k.inspect_asm().values())
        failed |= fma != 0
        rows.append(("PTX fma.rn.f64", "step/decay/position/undecay", str(fma), "must be 0"))
    rows.append(("total", "", f"{time.perf_counter() - t_start:.0f} s", "FAILED" if failed
                 else "all checks passed"))
    print(_table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
