"""``sweep(device="cuda")`` against ``sweep(device="cpu")`` (see conftest.py for how this runs).

Under the simulator both devices run the very same per-thread Python functions of
``hypergrad_fast._gpu_models`` (compiled by ``@njit`` on the CPU, interpreted on
NumPy scalars by the simulator) in the same order, with IEEE float64 arithmetic and
no fused multiply-adds on either side, and ``math.exp``/``log``/``tanh`` from the same
C library.  So every float is the same: the engine states agree bit for bit and the
hypergradients are *equal*, not merely close.  (On a real GPU, NVVM's FMA
contraction and libdevice's ``exp``/``tanh`` change the last bits; there the
results agree to rounding, not bit for bit.)

Sizes are tiny: the simulator costs about 130 microseconds per thread.
"""


import numpy as np
import pytest
from numba import cuda

from hypergrad_fast.engine.gpu import _simulator_on
from hypergrad_fast.models import MLP, LogisticRegression
from hypergrad_fast.hypergrad.sweep import SweepResult, sweep

RUNS, ITERS = 2, 4


def _problem(model, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
    train = (rng.standard_normal((6, n_in)), np.eye(n_out)[rng.integers(0, n_out, 6)])
    valid = (rng.standard_normal((4, n_in)), np.eye(n_out)[rng.integers(0, n_out, 4)])
    g = model.layout.n_groups
    return dict(
        model=model, data=(train, valid),
        alphas=rng.uniform(0.1, 0.5, (RUNS, ITERS, g)),
        # run 1's tiny decays store about 8 bits a step: the word stacks fill up
        betas=np.stack([rng.uniform(0.5, 0.95, ITERS), rng.uniform(1e-3, 1e-2, ITERS)]),
        log_init_scales=rng.uniform(-2.0, -1.0, (RUNS, g)),
        meta=rng.uniform(-4.0, -2.0, (RUNS, g)),
        batch_size=3, seed=1, x0_noise=2)


def _run_with_states(device, args, **options):
    """sweep(...) and the engine's exact state after the forward pass."""
    seen = {}
    out = sweep(**args, device=device, **options,
                _inspect=lambda stage, be: seen.setdefault(stage, be.state()))
    return out, seen["forward"]


def _close_to_rounding(actual, desired, field):
    """Agreement to a few ulps of the largest value, as rounding differences give."""
    actual, desired = np.asarray(actual, float), np.asarray(desired, float)
    scale = max(np.abs(desired).max(), 1e-300)
    err = np.abs(actual - desired).max() / scale
    assert err < 1e-12, f"{field}: cuda and cpu differ by {err:.2e} of the largest value"


@pytest.mark.parametrize("model", [MLP([3, 4, 3], "tanh"), LogisticRegression(6, 3)],
                         ids=["mlp31", "logreg21"])
def test_cuda_equals_cpu(model):
    """Against the CPU twins of the GPU's model kernels (``_kernels=True``): bit for bit under
    the simulator; on a GPU, to rounding (see the module docstring).  Against the
    compiled CPU objective (BLAS sums in another order): to rounding."""
    args = _problem(model)
    cpu, cpu_state = _run_with_states("cpu", args, _kernels=True)
    gpu, gpu_state = _run_with_states("cuda", args)
    compiled = sweep(**args, device="cpu")
    assert gpu.status == cpu.status == compiled.status == ("ok",) * len(gpu.status)
    for field in SweepResult._fields:
        if field not in ("aux_bits", "status"):
            _close_to_rounding(getattr(gpu, field), getattr(compiled, field), field)
    assert cpu_state.words.shape[0] > 0  # the buffer holds digits
    assert np.abs(gpu.d_alphas).max() > 0 and np.abs(gpu.d_meta).max() > 0
    if not _simulator_on():
        for field in ("x", "v"):  # fixed point: the gradients' last bits move a unit or two
            _close_to_rounding(getattr(gpu_state, field), getattr(cpu_state, field), field)
        for field in SweepResult._fields[:-1]:  # status: compared above
            if field == "aux_bits":  # counts the digits held, which differ with the states
                np.testing.assert_allclose(gpu.aux_bits, cpu.aux_bits, rtol=1e-6)
            else:
                _close_to_rounding(getattr(gpu, field), getattr(cpu, field), field)
        return
    for field in cpu_state._fields:
        np.testing.assert_array_equal(getattr(gpu_state, field), getattr(cpu_state, field),
                                      err_msg=f"engine state {field}")
    for field in SweepResult._fields:
        np.testing.assert_array_equal(getattr(gpu, field), getattr(cpu, field), err_msg=field)


# A custom problem with device functions: per run b, the training loss
# sum(0.5 a_b x**2 + 0.25 s_t x**4) with a_b = exp(meta[b]), s_t = 1 + t / 4,
# and the validation loss 0.5 sum((x - 1)**2).
@cuda.jit
def _quartic_grad(x, a, s, out):
    j = cuda.grid(1)
    if j < x.size:
        b, i = j // x.shape[1], j % x.shape[1]
        xi = x[b, i]
        out[b, i] = a[b] * xi + s * xi * xi * xi


@cuda.jit
def _quartic_hvp(x, a, s, vec, hx, hmeta):
    b = cuda.grid(1)
    if b < x.shape[0]:
        acc = 0.0
        for i in range(x.shape[1]):
            xi = x[b, i]
            hx[b, i] = (a[b] + 3.0 * s * xi * xi) * vec[b, i]
            acc += xi * vec[b, i]
        hmeta[b] = a[b] * acc


@cuda.jit
def _half_square_distance(x, loss, g):
    b = cuda.grid(1)
    if b < x.shape[0]:
        acc = 0.0
        for i in range(x.shape[1]):
            d = x[b, i] - 1.0
            g[b, i] = d
            acc += 0.5 * d * d
        loss[b] = acc


def _device_functions(a, seen):
    a_dev = cuda.to_device(a)

    def grad_fn(x, meta, t):
        seen.add(cuda.devicearray.is_cuda_ndarray(x))
        out = cuda.device_array(x.shape)
        _quartic_grad[4, 8](x, a_dev, 1.0 + t / 4, out)
        return out

    def hvp_fn(x, meta, t, vec):
        hx, hmeta = cuda.device_array(x.shape), cuda.device_array(x.shape[0])
        _quartic_hvp[1, 8](x, a_dev, 1.0 + t / 4, vec, hx, hmeta)
        return hx, hmeta

    def valid_fn(x):
        loss, g = cuda.device_array(x.shape[0]), cuda.device_array(x.shape)
        _half_square_distance[1, 8](x, loss, g)
        return loss, g

    return grad_fn, hvp_fn, valid_fn


def _host_functions(a):
    def grad_fn(x, meta, t):
        return a[:, None] * x + (1.0 + t / 4) * x * x * x

    def hvp_fn(x, meta, t, vec):
        return (a[:, None] + 3.0 * (1.0 + t / 4) * x * x) * vec, a * (x * vec).sum(axis=1)

    def valid_fn(x):
        return 0.5 * ((x - 1.0) ** 2).sum(axis=1), x - 1.0

    return grad_fn, hvp_fn, valid_fn


def test_custom_device_functions_match_host_functions():
    model = LogisticRegression(4, 3)  # only its layout: N = 15, G = 2
    rng = np.random.default_rng(5)
    meta = np.array([-0.5, 0.3])
    args = dict(model=model.layout, data=None, alphas=rng.uniform(0.1, 0.3, (RUNS, ITERS)),
                betas=rng.uniform(0.5, 0.9, (RUNS, ITERS, 2)), log_init_scales=-1.0, meta=meta)
    seen = set()
    gpu = sweep(**args, device="cuda", **dict(zip(("grad_fn", "hvp_fn", "valid_fn"),
                                                  _device_functions(np.exp(meta), seen))))
    cpu = sweep(**args, device="cpu", **dict(zip(("grad_fn", "hvp_fn", "valid_fn"),
                                                 _host_functions(np.exp(meta)))))
    assert seen == {True}  # grad_fn got device arrays
    # the host sums of NumPy are pairwise, the kernels' sequential: equal to rounding
    assert gpu.status == cpu.status == ("ok",) * RUNS
    for field in SweepResult._fields[:-1]:
        np.testing.assert_allclose(getattr(gpu, field), getattr(cpu, field), rtol=1e-12,
                                   atol=1e-15, err_msg=field)
    assert gpu.d_meta.shape == meta.shape and np.abs(gpu.d_meta).max() > 0
