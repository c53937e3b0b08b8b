"""``sweep`` on the CPU: each setting's row against autograd through ``sgd`` for that setting.

The simulator tests of ``device="cuda"`` are in ``tests/gpu/test_sweep_sim.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, make_vjp, value_and_grad

from hypergrad_fast.data import Split
from hypergrad_fast.engine.gpu import _simulator_on, gpu_available
from hypergrad_fast.models import MLP, LogisticRegression, make_train_loss
from hypergrad_fast.hypergrad.sgd import SgdRecovery, sgd
from hypergrad_fast.hypergrad.sweep import SweepResult, sweep

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-8
RUNS, ITERS, BATCH, SEED, NOISE_SEED = 3, 12, 10, 3, 5


def _data(model, n_train=40, n_valid=25, seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out = model.layer_sizes[0], model.layer_sizes[-1]
    train = (rng.standard_normal((n_train, n_in)),
             np.eye(n_out)[rng.integers(0, n_out, n_train)])
    valid = (rng.standard_normal((n_valid, n_in)),
             np.eye(n_out)[rng.integers(0, n_out, n_valid)])
    return train, valid


def _settings(model, alpha_groups, beta_groups, seed=1):
    """B settings: schedules (B, T) or (B, T, G), log init scales and log L2 strengths (B, G)."""
    rng = np.random.default_rng(seed)
    g = model.layout.n_groups
    alphas = rng.uniform(0.1, 0.5, (RUNS, ITERS, g) if alpha_groups else (RUNS, ITERS))
    betas = rng.uniform(0.5, 0.95, (RUNS, ITERS, g) if beta_groups else (RUNS, ITERS))
    return alphas, betas, rng.uniform(-2.0, -1.0, (RUNS, g)), rng.uniform(-4.0, -2.0, (RUNS, g))


def _reference(model, train, valid, alphas, betas, log_scales, log_l2):
    """Valid loss, x_T and hypergradients of one setting by autograd through ``sgd``."""
    layout = model.layout
    noise = np.random.default_rng(NOISE_SEED).standard_normal(layout.size)
    loss = make_train_loss(model, *train, BATCH, seed=SEED,
                           l2=None if log_l2 is None else "group")
    final = []

    def hyperloss(h):
        scales, a, b = h[0], h[1], h[2]
        l2 = h[3] if len(h) == 4 else None
        x0 = anp.exp(layout.expand(scales)) * noise
        meta = None if l2 is None else {"log_l2": l2}
        x_final = sgd(loss, x0, a, b, meta, groups=layout.groups)
        final.append(x_final)
        return model.loss(x_final, *valid)

    h = (log_scales, alphas, betas) + (() if log_l2 is None else (log_l2,))
    value, grads = value_and_grad(hyperloss)(h)
    return value, grads, final[0]._value


def _assert_close(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    assert np.abs(ref).max() > 0, what
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0, err_msg=what)


MODELS = {"logreg": LogisticRegression(30, 5), "mlp": MLP([10, 12, 4], "tanh")}


@pytest.mark.parametrize("name, alpha_groups, beta_groups, l2", [
    ("logreg", False, False, True),
    ("logreg", True, False, False),
    ("mlp", True, True, True),
    ("mlp", False, True, True),
    ("mlp", False, False, False),
])
def test_each_row_matches_autograd_through_sgd(name, alpha_groups, beta_groups, l2):
    model = MODELS[name]
    train, valid = _data(model)
    alphas, betas, log_scales, log_l2 = _settings(model, alpha_groups, beta_groups)
    log_l2 = log_l2 if l2 else None
    out = sweep(model, (train, valid), alphas, betas, log_scales, log_l2, batch_size=BATCH,
                seed=SEED, x0_noise=NOISE_SEED)
    assert isinstance(out, SweepResult)
    assert (out.d_meta is None) == (not l2)
    for b in range(RUNS):
        value, grads, x_final = _reference(model, train, valid, alphas[b], betas[b],
                                           log_scales[b], None if log_l2 is None else log_l2[b])
        np.testing.assert_allclose(out.valid_loss[b], value, rtol=RTOL)
        np.testing.assert_allclose(out.x_final[b], x_final, rtol=RTOL, atol=RTOL)
        _assert_close(out.d_log_init_scales[b], grads[0], f"d_log_init_scales[{b}]")
        _assert_close(out.d_alphas[b], grads[1], f"d_alphas[{b}]")
        _assert_close(out.d_betas[b], grads[2], f"d_betas[{b}]")
        if l2:
            _assert_close(out.d_meta[b], grads[3], f"d_meta[{b}]")
    assert out.aux_bits > 0


def _autograd_functions(model, train, valid, log_l2):
    """grad_fn, hvp_fn, valid_fn for sweep, row by row with autograd (host arrays)."""
    loss = make_train_loss(model, *train, BATCH, seed=SEED, l2="group")
    loss_grad = grad(loss)

    def grad_fn(x, meta, t):
        return np.stack([loss_grad(x[b], {"log_l2": meta[b]}, t) for b in range(len(x))])

    def hvp_fn(x, meta, t, vec):
        hx, hmeta = [], []
        for b in range(len(x)):
            vjp, _ = make_vjp(lambda xm: loss_grad(xm[0], {"log_l2": xm[1]}, t))((x[b], meta[b]))
            h_x, h_m = vjp(vec[b])
            hx.append(h_x)
            hmeta.append(h_m)
        return np.stack(hx), np.stack(hmeta)

    def valid_fn(x):
        pairs = [value_and_grad(model.loss)(row, *valid) for row in x]
        return np.array([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    return grad_fn, hvp_fn, valid_fn


def test_custom_functions_give_the_builtin_results():
    model = MODELS["mlp"]
    train, valid = _data(model)
    alphas, betas, log_scales, log_l2 = _settings(model, True, False, seed=2)
    builtin = sweep(model, (Split(*train, None), Split(*valid, None)), alphas, betas,
                    log_scales, log_l2, batch_size=BATCH, seed=SEED, x0_noise=NOISE_SEED)
    grad_fn, hvp_fn, valid_fn = _autograd_functions(model, train, valid, log_l2)
    custom = sweep(model.layout, None, alphas, betas, log_scales, log_l2,
                   x0_noise=np.random.default_rng(NOISE_SEED).standard_normal(model.layout.size),
                   grad_fn=grad_fn, hvp_fn=hvp_fn, valid_fn=valid_fn)
    for field in SweepResult._fields[:-2]:  # not aux_bits, status
        _assert_close(getattr(custom, field), getattr(builtin, field), field)
    # the gradients differ in the last bits, so other digits fill the information buffer
    assert custom.aux_bits == pytest.approx(builtin.aux_bits, rel=1e-6)


def test_nondeterministic_gradients_are_caught():
    model = MODELS["logreg"]
    train, valid = _data(model)
    alphas, betas, log_scales, log_l2 = _settings(model, False, False)
    grad_fn, hvp_fn, valid_fn = _autograd_functions(model, train, valid, log_l2)
    rng = np.random.default_rng(0)

    def noisy(x, meta, t):
        return grad_fn(x, meta, t) + 1e-3 * rng.standard_normal(x.shape)

    with pytest.raises(SgdRecovery, match="did not recover x0 bit for bit"):
        sweep(model, None, alphas[:, :3], betas[:, :3], log_scales, log_l2, grad_fn=noisy,
              hvp_fn=hvp_fn, valid_fn=valid_fn)


def _args():
    model = MODELS["logreg"]
    train, valid = _data(model)
    alphas, betas, log_scales, log_l2 = _settings(model, False, False)
    return dict(model=model, data=(train, valid), alphas=alphas, betas=betas,
                log_init_scales=log_scales, meta=log_l2, batch_size=BATCH)


def _bad_betas(value, where):
    betas = _args()["betas"].copy()
    betas[where] = value
    return betas


@pytest.mark.parametrize("change, error, match", [
    (dict(device="gpu"), ValueError,
     r"device must be one of \('cpu', 'cuda', 'auto'\), got 'gpu'"),
    (dict(alphas=np.ones(ITERS)), ValueError, r"alphas must have shape \(B, T\) or \(B, T, G\)"),
    (dict(alphas=np.ones((RUNS, ITERS, 3))), ValueError,
     r"alphas has shape \(3, 12, 3\): its last axis .* \(2\)"),
    (dict(alphas=np.full((RUNS, ITERS), np.nan)), FloatingPointError,
     r"alphas\[0, 0\] = nan is not finite"),
    (dict(alphas=np.full((RUNS, ITERS), "a")), TypeError, "alphas must be a real numeric"),
    (dict(betas=np.full((RUNS, ITERS + 1), 0.9)), ValueError,
     r"betas must have the \(B, T\) = \(3, 12\) of alphas, got \(3, 13\)"),
    (dict(betas=_bad_betas(1.5, (1, 4))), ValueError, r"betas\[1, 4\] = 1.5 is outside \(0, 1\]"),
    (dict(betas=_bad_betas(0.0, (2, 0))), ValueError, r"betas\[2, 0\] = 0.0 is outside \(0, 1\]"),
    (dict(betas=_bad_betas(np.inf, (0, 1))), FloatingPointError, r"betas\[0, 1\] = inf is not"),
    (dict(log_init_scales=np.zeros(5)), ValueError, r"log_init_scales must be a scalar or "
                                                    r"have shape \(2,\) or \(3, 2\)"),
    (dict(meta=np.full((RUNS, 2), np.nan)), FloatingPointError, r"meta\[0, 0\] = nan"),
    (dict(meta=np.zeros((2, 2))), ValueError, r"meta must be a scalar or have shape"),
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1 or None, got 0"),
    (dict(batch_size=2.5), ValueError, r"batch_size must be an integer >= 1 or None, got 2.5"),
    (dict(frac_bits=True), ValueError, r"frac_bits must be an integer in \[0, 60\], got True"),
    (dict(x0_noise=np.zeros(7)), ValueError, r"x0_noise must be a seed or have shape \(155,\)"),
    (dict(frac_bits=70), ValueError, r"frac_bits must be an integer in \[0, 60\], got 70"),
    (dict(data=None), ValueError, r"data must be \(train, valid\)"),
    (dict(data=(np.zeros((4, 30)), np.zeros((4, 5)))), TypeError,
     r"train data must be an \(inputs, targets\) pair"),
    (dict(data=((np.zeros((4, 29)), np.zeros((4, 5))), (np.zeros((4, 30)), np.zeros((4, 5))))),
     ValueError, r"train inputs must have shape \(n, 30\)"),
    (dict(data=((np.zeros((4, 30)), np.zeros((4, 5))), (np.zeros((4, 30)), np.zeros((3, 5))))),
     ValueError, r"valid targets must have shape \(4, 5\), got \(3, 5\)"),
    (dict(model=MLP([30, 4, 5], "relu"), device="cuda"), ValueError,
     "support tanh hidden layers"),
    (dict(model=object()), TypeError, "model must be a hypergrad_fast.models.MLP"),
    (dict(grad_fn=lambda x, m, t: x), ValueError, r"missing \['hvp_fn', 'valid_fn'\]"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = dict(_args(), **change)
    with pytest.raises(error, match=match):
        sweep(**args)


@pytest.mark.skipif(gpu_available(), reason="a GPU (or the simulator) is usable here")
def test_cuda_without_a_gpu_fails_clearly_and_cpu_still_works():
    with pytest.raises(RuntimeError, match=r"sweep\(device='cuda'\) needs a CUDA GPU, and none "
                                           r"is usable here: \w+") as info:
        sweep(**_args(), device="cuda")
    assert "NUMBA_ENABLE_CUDASIM=1" in str(info.value)
    args = dict(_args(), alphas=_args()["alphas"][:, :2], betas=_args()["betas"][:, :2])
    assert np.isfinite(sweep(**args, device="cpu").valid_loss).all()


_COMPILE = """
import json, os, sys
os.environ.setdefault("NUMBA_FORCE_CUDA_CC", "9.0")
sys.path.insert(0, os.path.join("tests", "gpu"))
import compile_ptx
try:
    import numba
    import numpy as np
    from numba import cuda
    compile_ptx._patch()
    from hypergrad_fast.objectives import _gpu_mlp as gm
    kernels = gm.gpu_kernels()
except Exception as exc:
    compile_ptx._report("skip", f"cannot set up compilation: {type(exc).__name__}: {exc}")
f1, f2, f3 = np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3, 4))
i1, i2, n = np.zeros(3, np.int64), np.zeros((2, 3), np.int64), np.int64(1)
lay = (i1, i1, i1, i1)
args = {
    "example_pass": (n, f2, f2, f2, i2, n, n, *lay, f3, f3, f2),
    "param_grad": (n, f2, f2, i2, n, n, *lay, f3, f3, f2, i1, f2),
    "example_r_pass": (n, f2, f2, f2, f2, i2, n, n, *lay, f3, f3, f3, f3),
    "param_hvp": (n, f2, f2, f2, i2, n, n, *lay, f3, f3, f3, f3, f2, i1, f2),
    "l2_meta": (n, f2, f2, f2, i1, f2),
    "mean_rows": (n, f2, n, f1),
    "group_dot": (n, f2, f2, f2, False, i1, f3, n),
    "velocity_cotangent": (n, f2, f2, f3, n, i1),
    "hvp_direction": (n, f2, f2, f3, n, i1),
    "after_hvp": (n, f2, f2, f2, f3, n, i1),
    "add_flat": (n, f1, f1),
}
from numba.core.errors import NumbaError as CoreNumbaError
from numba.cuda.core.errors import NumbaError as CudaNumbaError
report = {}
for name in gm.KERNEL_NAMES:
    sig = tuple(numba.typeof(a) for a in args[name])
    try:
        ptx, _ = cuda.compile_ptx(getattr(kernels, name).py_func, sig, cc=(9, 0))
    except (CoreNumbaError, CudaNumbaError) as exc:
        compile_ptx._report("fail", f"{name}: {type(exc).__name__}: {exc}", report)
    except Exception as exc:  # NVVM or a library missing: the environment, not the code
        compile_ptx._report("skip", f"{name}: {type(exc).__name__}: {exc}", report)
    report[name] = {"lines": ptx.count(chr(10)), "entry": ".entry" in ptx}
compile_ptx._report("ok", "", report)
"""


@pytest.mark.skipif(_simulator_on(), reason="compiles for the real target, not the simulator")
def test_model_kernels_compile_for_sm90():
    """The simulator runs kernels as Python; only the real compiler checks typing and lowering."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["status"] == "skip":
        pytest.skip(f"no CUDA compiler here: {report['reason']}")
    assert report["status"] == "ok", report["reason"]
    from hypergrad_fast.objectives._gpu_mlp import KERNEL_NAMES
    assert set(report["kernels"]) == set(KERNEL_NAMES)
    assert all(k["entry"] for k in report["kernels"].values())
