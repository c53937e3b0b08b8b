"""The batched GPU engine against B CPU engines, bit for bit (see conftest.py for how this runs).

Sizes are tiny: the simulator costs about 130 microseconds per thread.
"""

import numpy as np
import pytest
from numba import cuda

from hypergrad_fast.engine._arith import STATE_INIT
from hypergrad_fast.engine import ReversibleMomentum
from hypergrad_fast.engine.gpu import BatchedReversibleMomentum


def _row(coef, b):
    """Run b's share of a batched coefficient: what its CPU engine gets."""
    coef = np.asarray(coef)
    return coef.item() if coef.ndim == 0 else coef[b]


def _schedules(rng, runs, n, steps):
    """Per-step alphas and betas cycling through scalar, per-run and per-parameter layouts.

    Betas span the whole range: 1 (no decay), tiny values clipped to 2 / 2**16
    (16 bits a step, so the stacks grow fast), and everything between; alphas
    include dyadic values, whose products with v hit rounding ties.
    """
    alphas = [0.5, rng.uniform(0.05, 0.6, runs), rng.uniform(0.05, 0.6, (runs, n)), 0.25,
              np.array([0.125, 0.375, 0.5][:runs]), 0.3]
    betas = [rng.uniform(0.5, 0.99, runs), 1e-4, rng.uniform(1e-6, 1.0, (runs, n)), 1.0, 0.9,
             np.array([1e-3, 0.5, 1e-6][:runs])]
    return ([alphas[t % len(alphas)] for t in range(steps)],
            [betas[t % len(betas)] for t in range(steps)])


def _gradient(x, t):
    """A position-dependent gradient, as in training."""
    return np.sin(3.0 * x + t) + 0.5 * x


def _assert_same(gpu, cpus):
    """The batched engine's state equals each run's CPU engine, bit for bit."""
    s = gpu.state
    assert s.words.shape[1:] == s.x.shape
    for b, cpu in enumerate(cpus):
        c = cpu.state
        for field in ("x", "v", "coder", "height"):
            np.testing.assert_array_equal(getattr(s, field)[b], getattr(c, field),
                                          err_msg=f"{field} of run {b}")
        rows = c.words.shape[0]
        np.testing.assert_array_equal(s.words[:rows, b], c.words, err_msg=f"words of run {b}")
    assert gpu.aux_bits == pytest.approx(sum(c.aux_bits for c in cpus), rel=1e-12)


def _assert_state_equal(a, b):
    for field in a._fields:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def _run_forward(gpu, cpus, alphas, betas, check=True):
    gs = []
    for t, (alpha, beta) in enumerate(zip(alphas, betas)):
        g = _gradient(gpu.x, t)
        gs.append(g)
        gpu.step(g, alpha, beta)
        for b, cpu in enumerate(cpus):
            cpu.step(g[b], _row(alpha, b), _row(beta, b))
        if check:
            _assert_same(gpu, cpus)
    return gs


def _run_reverse(gpu, cpus, alphas, betas, gs, check=True):
    for t in reversed(range(len(gs))):
        gpu.unstep_position(alphas[t])
        gpu.unstep_velocity(gs[t], betas[t])
        for b, cpu in enumerate(cpus):
            cpu.unstep_position(_row(alphas[t], b))
            cpu.unstep_velocity(gs[t][b], _row(betas[t], b))
        if check:
            _assert_same(gpu, cpus)


def _setup(seed, runs, n, frac_bits=52, v0=False):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((runs, n))
    v0 = 0.1 * rng.standard_normal((runs, n)) if v0 else None
    gpu = BatchedReversibleMomentum(x0, v0, frac_bits=frac_bits)
    cpus = [ReversibleMomentum(x0[b], None if v0 is None else v0[b], frac_bits=frac_bits)
            for b in range(runs)]
    return rng, x0, gpu, cpus


@pytest.mark.parametrize("seed, runs, n, frac_bits, v0, steps", [
    (0, 3, 13, 52, False, 12),
    (1, 2, 40, 30, True, 12),
    (2, 3, 7, 52, True, 30),
])
def test_bit_identity_with_cpu_engine_forward_and_back(seed, runs, n, frac_bits, v0, steps):
    rng, x0, gpu, cpus = _setup(seed, runs, n, frac_bits, v0)
    start = gpu.state
    _assert_same(gpu, cpus)
    alphas, betas = _schedules(rng, runs, n, steps)
    gs = _run_forward(gpu, cpus, alphas, betas)
    assert gpu.iterations == steps
    assert gpu.state.height.max() >= 2  # the word stacks were used (and grown)
    _run_reverse(gpu, cpus, alphas, betas, gs)
    assert gpu.iterations == 0
    end = gpu.state
    np.testing.assert_array_equal(end.x, start.x)
    np.testing.assert_array_equal(end.v, start.v)
    assert (end.coder == STATE_INIT).all() and (end.height == 0).all()
    assert end.words.shape[0] == 0
    if not v0:
        np.testing.assert_array_equal(gpu.v, 0.0)
    # and x is x0 as the engine first rounded it
    np.testing.assert_array_equal(gpu.x, np.array([ReversibleMomentum(row, frac_bits=frac_bits).x
                                                   for row in x0]))


def test_device_inputs_match_host_inputs():
    rng = np.random.default_rng(3)
    runs, n = 2, 11
    x0 = rng.standard_normal((runs, n))
    host = BatchedReversibleMomentum(x0)
    dev = BatchedReversibleMomentum(cuda.to_device(x0))
    for t in range(4):
        g = _gradient(host.x, t)
        host.step(g, 0.4, np.array([0.2, 0.7]))
        dev.step(cuda.to_device(g), 0.4, np.array([0.2, 0.7]))
    _assert_state_equal(host.state, dev.state)


def test_nan_gradient_names_element_and_rolls_back():
    rng, x0, gpu, cpus = _setup(4, 3, 12)
    alphas, betas = _schedules(rng, 3, 12, 5)
    _run_forward(gpu, cpus, alphas[:4], betas[:4], check=False)
    before = gpu.state
    g = _gradient(gpu.x, 4)
    g[2, 3] = np.nan
    g[1, 5] = np.nan  # the smaller flat index is the one reported
    with pytest.raises(FloatingPointError, match=r"g\[1, 5\] = nan is not finite"):
        gpu.step(g, alphas[4], betas[4])
    _assert_state_equal(gpu.state, before)
    assert gpu.iterations == 4
    # the engine goes on as if the failed call never happened
    _run_forward(gpu, cpus, alphas[4:], betas[4:])


def test_position_overflow_in_step_names_element_and_rolls_back():
    rng, x0, gpu, cpus = _setup(5, 2, 10)
    gpu.step(_gradient(gpu.x, 0), 0.5, 0.5)
    before = gpu.state
    alpha = np.full((2, 10), 0.5)
    alpha[1, 7] = 1e30
    with pytest.raises(OverflowError, match=r"step overflows the fixed-point range at run 1, "
                                            r"parameter 7 .*alpha=1e\+30, beta=0\.5\)"):
        gpu.step(_gradient(gpu.x, 1), alpha, 0.5)
    _assert_state_equal(gpu.state, before)


def test_reverse_failures_roll_back_then_reverse_recovers_x0():
    steps = 8
    rng, x0, gpu, cpus = _setup(6, 3, 9)
    start = gpu.state
    alphas, betas = _schedules(rng, 3, 9, steps)
    gs = _run_forward(gpu, cpus, alphas, betas, check=False)
    before = gpu.state
    assert before.height.max() >= 1

    big = np.full((3, 9), 1e30)
    with pytest.raises(OverflowError, match=r"unstep_position overflows .* at run 0, parameter 0"):
        gpu.unstep_position(big)
    _assert_state_equal(gpu.state, before)

    gpu.unstep_position(alphas[-1])
    after_position = gpu.state
    g = gs[-1].copy()
    g[2, 4] = np.inf
    with pytest.raises(FloatingPointError, match=r"g\[2, 4\] = inf is not finite"):
        gpu.unstep_velocity(g, betas[-1])
    # the masked decay re-pushed exactly the words the others had popped
    _assert_state_equal(gpu.state, after_position)
    gpu.unstep_velocity(gs[-1], betas[-1])

    for cpu, b in zip(cpus, range(3)):
        cpu.unstep_position(_row(alphas[-1], b))
        cpu.unstep_velocity(gs[-1][b], _row(betas[-1], b))
    _assert_same(gpu, cpus)
    _run_reverse(gpu, cpus, alphas[:-1], betas[:-1], gs[:-1], check=False)
    _assert_state_equal(gpu.state, start)


def test_reserve_sizes_the_stacks_once():
    steps = 10
    rng, x0, gpu, cpus = _setup(7, 2, 8)
    betas = [1e-5, np.array([0.01, 0.5]), 1e-5, 0.2, 1e-5] * 2
    gpu.reserve(steps, np.array([np.broadcast_to(b, (2,)) for b in betas]))
    reserved = gpu.aux_nbytes
    assert reserved > 0
    for t in range(steps):
        gpu.step(_gradient(gpu.x, t), 0.3, betas[t])
    assert gpu.aux_nbytes == reserved
    assert gpu.state.height.max() >= 5


def test_validation_messages():
    rng, x0, gpu, cpus = _setup(8, 2, 5)
    g = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"alpha must be a scalar or have shape \(2,\) or "
                                         r"\(2, 5\), got shape \(5,\)"):
        gpu.step(g, np.ones(5), 0.5)
    with pytest.raises(ValueError, match=r"beta\[1\] = 0.0 is outside \(0, 1\]"):
        gpu.step(g, 0.1, np.array([0.5, 0.0]))
    bad = np.ones((2, 5))
    bad[0, 3] = np.nan
    with pytest.raises(FloatingPointError, match=r"alpha\[0, 3\] = nan is not finite"):
        gpu.step(g, bad, 0.5)
    with pytest.raises(ValueError, match=r"g has shape \(5,\), expected \(2, 5\)"):
        gpu.step(np.zeros(5), 0.1, 0.5)
    with pytest.raises(TypeError, match="g must be a real numeric array"):
        gpu.step(np.array([["a"] * 5] * 2), 0.1, 0.5)
    with pytest.raises(TypeError, match="g on the device must be float64"):
        gpu.step(cuda.to_device(np.zeros((2, 5), np.float32)), 0.1, 0.5)
    with pytest.raises(ValueError, match="no step left to undo"):
        gpu.unstep_position(0.1)
    with pytest.raises(RuntimeError, match="unstep_velocity must follow unstep_position"):
        gpu.unstep_velocity(g, 0.5)
    with pytest.raises(ValueError, match=r"x0 must be a 2-D array \(runs, parameters\)"):
        BatchedReversibleMomentum(np.zeros(3))
    x_bad = np.zeros((2, 3))
    x_bad[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match=r"x0\[1, 2\] = nan is not finite"):
        BatchedReversibleMomentum(x_bad)
    with pytest.raises(OverflowError, match=r"v0\[0, 1\] = 10000000000.0 leaves the "
                                            r"fixed-point range: with frac_bits=52"):
        BatchedReversibleMomentum(np.zeros((2, 3)), np.array([[0, 1e10, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="frac_bits must be an integer"):
        BatchedReversibleMomentum(np.zeros((2, 3)), frac_bits=61)
    assert gpu.iterations == 0
    _assert_same(gpu, cpus)


def test_full_stack_is_refused_without_touching_the_element(monkeypatch):
    """A push into a stack with no room left fails cleanly: nothing is written, all undone."""
    rng, x0, gpu, cpus = _setup(9, 2, 6)
    monkeypatch.setattr(gpu, "_ensure_room", lambda: None)  # never grow: no rows at all
    with pytest.raises(RuntimeError, match=r"internal error: the information buffer of run \d, "
                                           r"parameter \d is corrupt or was not grown"):
        for t in range(8):  # 16 bits a step: the first spill comes within a few steps
            before, steps = gpu.state, gpu.iterations
            gpu.step(_gradient(gpu.x, t), 0.3, 1e-6)
    _assert_state_equal(gpu.state, before)
    assert gpu.iterations == steps


def test_step_after_overdrawn_buffer_is_refused_and_changes_nothing():
    # Undoing with a smaller beta than the step used is a misuse, but a legal call:
    # it takes more bits than the step stored, borrowing zero words (height -3).
    gpu = BatchedReversibleMomentum(np.zeros((2, 1)))
    for _ in range(3):
        gpu.step(np.zeros((2, 1)), 0.0, 1.0)
    for _ in range(3):
        gpu.unstep_position(0.0)
        gpu.unstep_velocity(np.zeros((2, 1)), 1e-9)
    assert (gpu.state.height == -3).all()
    rng = np.random.default_rng(1)
    for _ in range(200):  # the first word pushed below the bottom that is not 0
        before = gpu.state
        try:
            gpu.step(rng.standard_normal((2, 1)), 0.01, 0.5)
        except RuntimeError as exc:
            assert "run 0, parameter 0 was overdrawn" in str(exc)  # one message for CPU and GPU
            _assert_state_equal(gpu.state, before)
            return
    raise AssertionError("no step was refused")


def test_device_views_of_x_and_v_equal_the_host_copies():
    rng, x0, gpu, cpus = _setup(10, 2, 9, v0=True)
    gpu.step(_gradient(gpu.x, 0), 0.3, 0.7)
    np.testing.assert_array_equal(gpu.x_device().copy_to_host(), gpu.x)
    out = cuda.device_array((2, 9))
    assert gpu.v_device(out) is out
    np.testing.assert_array_equal(out.copy_to_host(), gpu.v)
    with pytest.raises(ValueError, match="must be a C-contiguous float64 device array"):
        gpu.x_device(cuda.device_array((9, 2)))


def test_refused_calls_in_a_random_run_leave_the_whole_state_equal():
    """Defect 7: a refused step's pushes were rolled back, but the popped words stayed
    above the stacks' tops, where ``state.words`` showed them."""
    rng, x0, gpu, cpus = _setup(11, 2, 24)
    beta = rng.uniform(0.01, 0.6, (2, 24))  # many words move to and from the stacks
    alpha = rng.uniform(0.01, 0.1, (2, 24))
    start = gpu.state
    taken, refused, highest = [], 0, 0

    def refuse(call, exc):
        nonlocal refused
        before, iterations = gpu.state, gpu.iterations
        with pytest.raises(exc):
            call()
        _assert_state_equal(gpu.state, before)
        assert gpu.iterations == iterations
        refused += 1

    def spoiled(g, value):
        bad = g.copy()
        bad[int(rng.integers(2)), int(rng.integers(24))] = value
        return bad

    for t in range(40):
        g = _gradient(gpu.x, t)
        if rng.random() < 0.4:
            kind = int(rng.integers(3))
            if kind == 0:
                refuse(lambda: gpu.step(spoiled(g, 1e30), alpha, beta), OverflowError)
            elif kind == 1:
                refuse(lambda: gpu.step(spoiled(g, np.nan), alpha, beta), FloatingPointError)
            else:
                refuse(lambda: gpu.step(g, spoiled(alpha, 1e30), beta), OverflowError)
        if taken and rng.random() < 0.3:
            g_back = taken.pop()
            gpu.unstep_position(alpha)
            if rng.random() < 0.5:
                refuse(lambda: gpu.unstep_velocity(spoiled(g_back, 1e30), beta),
                       OverflowError)
            gpu.unstep_velocity(g_back, beta)
        else:
            gpu.step(g, alpha, beta)
            taken.append(g)
        highest = max(highest, int(gpu.state.height.max()))
    assert refused >= 10 and highest >= 2
    while taken:  # and reversal stays exact
        gpu.unstep_position(alpha)
        gpu.unstep_velocity(taken.pop(), beta)
    _assert_state_equal(gpu.state, start)


def test_state_words_are_zero_above_every_stack():
    rng, x0, gpu, cpus = _setup(12, 2, 10)
    beta = rng.uniform(0.01, 1.0, (2, 10))
    gs = []
    for t in range(24):
        gs.append(_gradient(gpu.x, t))
        gpu.step(gs[-1], 0.2, beta)
    for t in range(12):  # popped words stay in device memory above the new tops
        gpu.unstep_position(0.2)
        gpu.unstep_velocity(gs.pop(), beta)
    s = gpu.state
    assert s.words.shape[0] == max(s.height.max(), 0)
    free = np.arange(s.words.shape[0])[:, None, None] >= s.height[None]
    assert free.any() and not s.words[free].any()


@pytest.mark.parametrize("beta, pattern", [
    (np.nan, r"beta = nan is not finite"),
    (0.0, r"beta = 0.0 is outside \(0, 1\]"),
    (7.0, r"beta = 7.0 is outside \(0, 1\]"),
    (np.array([0.5, np.inf]), r"beta\[1\] = inf is not finite"),
    (np.array([[0.5, 0.5, 0.5], [0.5, 0.0, 0.5]]), r"beta\[1, 1\] = 0.0 is outside"),
])
def test_reserve_refuses_bad_betas(beta, pattern):
    """Defect 9: reserve() took beta NaN, 0 and 7."""
    gpu = BatchedReversibleMomentum(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=pattern):
        gpu.reserve(4, beta)
    assert gpu.aux_nbytes == 0
    for iterations in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"iterations must be an integer >= 0"):
            gpu.reserve(iterations, 0.5)


def test_prepared_values_and_bool_frac_bits_are_refused():
    """Defect 9: the GPU engine takes plain coefficients only, and frac_bits=True is no 1."""
    gpu = BatchedReversibleMomentum(np.zeros((2, 3)))
    cpu = ReversibleMomentum(np.zeros(6))
    with pytest.raises(TypeError, match=r"alpha is a Prepared, which only the CPU engine takes"):
        gpu.step(np.zeros((2, 3)), cpu.prepare_alpha(0.1), 0.5)
    with pytest.raises(TypeError, match=r"beta is a Prepared"):
        gpu.step(np.zeros((2, 3)), 0.1, cpu.prepare_beta(0.5))
    assert gpu.iterations == 0
    for frac_bits in (True, False, 1.0):
        with pytest.raises(ValueError, match=r"frac_bits must be an integer in \[0, 60\]"):
            BatchedReversibleMomentum(np.zeros((2, 3)), frac_bits=frac_bits)


def test_adam_position_kernel_equals_the_cpu_kernel():
    """Adam's position update, GPU kernel against the CPU kernel on the same integers:
    the one ``_arith.adam_delta`` compiled for both (forward and undo, with ties,
    zero moments and refused elements)."""
    from hypergrad_fast.engine import _cpu_kernels as ck, _gpu_kernels as gk

    rng = np.random.default_rng(11)
    n = 40
    x = rng.integers(-2**53, 2**53, n)
    m = rng.integers(-2**50, 2**50, n)
    s = rng.integers(0, 2**58, n)
    m[::5], s[::5] = 0, 0  # zero moments: no move
    s[1::7] = 0  # m / eps: refused where it leaves the range
    alpha = rng.uniform(0.0, 0.2, n)
    alpha[::3] = 0.125  # dyadic: rounding ties
    for sign in (1, -1):
        x_cpu, status = x.copy(), np.zeros(-(-n // 8) * 8, np.uint8)
        first_fail = np.empty(1, np.int64)
        ck.adam_position.serial(x_cpu, m, s, alpha, 1e-8, 2.0**-52, 2.0**-60, 2.0**52,
                                np.int64(sign), status, np.int64(n), first_fail)
        x_gpu, gstatus = cuda.to_device(x.copy()), cuda.to_device(np.zeros(n, np.uint8))
        flags = cuda.to_device(np.array([n, 0], np.int64))
        gk.launch(gk.adam_position, n, x_gpu, cuda.to_device(m), cuda.to_device(s),
                  cuda.to_device(alpha), 0.0, gk.PER_ELEMENT, 1e-8, 2.0**-52, 2.0**-60,
                  2.0**52, np.int64(sign), np.int64(n), False, gstatus, flags)
        np.testing.assert_array_equal(x_gpu.copy_to_host(), x_cpu)
        np.testing.assert_array_equal(gstatus.copy_to_host() != 0, status[:n] != 0)
        assert (status[:n] != 0).any() and (x_cpu != x).any()
