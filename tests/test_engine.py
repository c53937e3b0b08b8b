"""Tests of the exact reversible momentum engine against the references in naive.py.

The contract under test (``hypergrad_fast.engine``): after T steps and T matching
reverse steps the exact integer state is back to its start bit for bit and the
buffer holds 0 bits; the buffer holds ``log2(2**16 / n)`` bits per parameter per
step; a refused call leaves the engine exactly as it was.
"""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import naive
from hypergrad_fast import (
    EngineState,
    Prepared,
    ReversibleMomentum,
    beta_numerator,
    effective_beta,
    information_bound,
)
from hypergrad_fast.engine import _arith, _cpu_kernels

# ---------------------------------------------------------------- helpers

#: Betas at the edges of the rational form n / 2**16: below 2 / 2**16 (held as
#: 2 / 2**16, the most bits per step), one step from 1, and exactly 1 (no bits).
SPECIAL_BETAS = (1e-9, 2.0**-16, 2.0**-15, 3 * 2.0**-16, 1e-3, 0.5, 0.9, 0.99,
                 1 - 2.0**-16, 1 - 1e-9, 1.0)

#: The test gradient: nonlinear in x and changing with t, so a reverse pass that
#: recomputes it at a wrong x or for a wrong t cannot come back to x0.
LIPSCHITZ = 1.75  # max |d/dx (tanh x + 0.25 sin 3x)|
GRAD_BOUND = 1.25  # max |tanh x + 0.25 sin(3x + t/100)|


def grad(x, t):
    return np.tanh(x) + 0.25 * np.sin(3.0 * x + 0.01 * t)


def assert_same_state(a, b):
    """Two EngineStates hold the same numbers, bit for bit.

    ``words`` is compared below each parameter's height only: the rows above a
    stack's top are free space (a rolled-back push leaves its word there).
    """
    for name in ("x", "v", "coder", "height"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), (
            f"{name} differs at {np.flatnonzero(x != y)[:5]}")
    assert a.words.dtype == b.words.dtype
    rows = max(a.words.shape[0], b.words.shape[0])
    live = np.arange(rows)[:, None] < a.height[None, :]
    wa, wb = (np.vstack([w, np.zeros((rows - w.shape[0], w.shape[1]), w.dtype)])
              for w in (a.words, b.words))
    assert np.array_equal(wa[live], wb[live]), "a stored word differs"


def initial_state(x0, v0, frac_bits):
    """The EngineState of a fresh engine, built with the reference rounding rule."""
    n = len(x0)
    v0 = np.zeros(n) if v0 is None else v0
    return EngineState(
        x=np.array([naive.to_fixed(a, frac_bits) for a in x0], dtype=np.int64),
        v=np.array([naive.to_fixed(a, frac_bits) for a in v0], dtype=np.int64),
        coder=np.full(n, _arith.STATE_INIT, dtype=np.uint64),
        height=np.zeros(n, dtype=np.int32),
        words=np.zeros((0, n), dtype=np.uint16))


# ---------------------------------------------------------------- problems

def _coefficient(draw, n, elements):
    """A scalar or a per-parameter array."""
    if draw(st.booleans()):
        return draw(elements)
    return draw(hnp.arrays(np.float64, n, elements=elements))


_BETAS = st.one_of(st.sampled_from(SPECIAL_BETAS),
                   st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=False))
_ALPHAS = st.one_of(st.sampled_from((0.0, 1e-9, 0.01, 0.1, 1.0)), st.floats(0.0, 1.0))


@st.composite
def problems(draw, max_size=300, max_steps=3000, max_work=60_000):
    """(x0, v0, frac_bits, alphas, betas): a run of random length and schedule.

    Half the runs are long (up to ``max_steps``) on at most 8 parameters, half are
    short on up to ``max_size``; ``size * steps <= max_work`` either way.

    ``|x|`` is scaled to a sixteenth of the fixed-point range (and at most 4); the
    gradient pulls x towards 0 and the step is stable (``alpha (1-beta) L < 2``), so
    no valid run leaves the range.  ``v0`` is small enough that, at beta = 1 where
    it never decays, ``T alpha v0`` stays in range too.
    """
    if draw(st.booleans()):  # long runs on few parameters
        n = draw(st.integers(1, min(8, max_size)))
        steps = draw(st.integers(min(max_steps, max_work // n) // 3,
                                 min(max_steps, max_work // n)))
    else:
        n = draw(st.integers(1, max_size))
        steps = draw(st.integers(0, min(max_steps // 10, max_work // n)))
    frac_bits = draw(st.integers(20, 58))
    alpha, beta = _coefficient(draw, n, _ALPHAS), _coefficient(draw, n, _BETAS)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # a schedule switching between two settings
        alpha2, beta2 = _coefficient(draw, n, _ALPHAS), _coefficient(draw, n, _BETAS)
        pick = rng.random(steps) < 0.5
        alphas = [alpha2 if p else alpha for p in pick]
        betas = [beta2 if p else beta for p in pick]
    else:
        alphas, betas = [alpha] * steps, [beta] * steps
    scale = min(4.0, 2.0 ** (62 - frac_bits - 4))
    x0 = rng.standard_normal(n) * scale
    v0 = None if draw(st.booleans()) else rng.standard_normal(n) * scale / (steps + 1)
    return x0, v0, frac_bits, alphas, betas


# ---------------------------------------------------------------- exact reversal


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reverse_pass_recovers_the_start_exactly(problem):
    x0, v0, frac_bits, alphas, betas = problem
    eng = ReversibleMomentum(x0, v0, frac_bits=frac_bits)
    start = eng.state
    assert_same_state(start, initial_state(x0, v0, frac_bits))
    assert eng.aux_bits == 0.0 and eng.iterations == 0

    steps = len(alphas)
    every = max(1, steps // 8)
    xs, vs, states = [], [], {}

    def record(e, t):
        xs.append(e.x)
        vs.append(e.v)
        if t % every == 0:
            states[t] = e.state
        assert e.iterations == t

    naive.run_forward(eng, grad, alphas, betas, record)

    def check(e, t):
        assert e.iterations == t
        # floats each step (cheap), the whole exact state at checkpoints
        assert np.array_equal(e.x, xs[t]) and np.array_equal(e.v, vs[t]), f"step {t}"
        if t in states:
            assert_same_state(e.state, states[t])

    naive.run_reverse(eng, grad, alphas, betas, check)
    end = eng.state
    assert_same_state(end, start)
    assert end.words.shape[0] == 0  # every stack is back to height 0
    assert eng.aux_bits == 0.0 and eng.iterations == 0


@settings(deadline=None, max_examples=15)
@given(problems(max_size=12, max_steps=150, max_work=600))
def test_naive_reference_is_exactly_reversible(problem):
    x0, v0, frac_bits, alphas, betas = problem
    ref = naive.NaiveReversibleMomentum(x0, v0, frac_bits=frac_bits)
    start = ref.state
    naive.run_forward(ref, grad, alphas, betas)
    naive.run_reverse(ref, grad, alphas, betas)
    assert ref.state == start and ref.buffer.empty and ref.iterations == 0


# ---------------------------------------------------------------- accuracy


def _float_run(eng_cls, problem, **kw):
    """The run's (x, v) per step, and the float64 reference with its error bound."""
    x0, v0, frac_bits, alphas, betas = problem
    eng = eng_cls(x0, v0, frac_bits=frac_bits)
    xs, vs = [], []
    naive.run_forward(eng, grad, alphas, betas,
                      lambda e, t: (xs.append(e.x), vs.append(e.v)))
    eff = [effective_beta(b) for b in betas]
    fx, fv, fg = naive.float_momentum(x0, v0, grad, alphas, eff)
    ex, ev = naive.fixed_point_error_bound(fx, fv, fg, alphas, eff, frac_bits, LIPSCHITZ,
                                           GRAD_BOUND, **kw)
    return np.array(xs), np.array(vs), fx, fv, ex, ev


def _assert_within(got, want, bound):
    # the comparison itself rounds: |fl(X) - X| and the subtraction, 2 eps each
    slack = bound + 4 * naive.EPS * (np.abs(want) + bound)
    # Where the bound overflowed (long runs, growing dynamics) it says nothing; the
    # first steps always have a finite bound, and every finite one is checked.
    finite = np.isfinite(slack)
    assert finite[:2].all()
    err = np.abs(got - want)
    bad = np.argwhere(finite & (err > slack))
    assert bad.size == 0, (f"step, param {bad[0]}: error {err[tuple(bad[0])]:.3g} "
                           f"> bound {slack[tuple(bad[0])]:.3g}")


@settings(deadline=None, max_examples=40)
@given(problems(max_steps=1000, max_work=20_000))
def test_trajectory_stays_within_the_float64_error_bound(problem):
    # decay_ulps=2: the coder's digit is within 2 of (v mod d) n / d (see
    # test_one_step_is_accurate), not merely within n as the paper's buffer gives.
    xs, vs, fx, fv, ex, ev = _float_run(ReversibleMomentum, problem, decay_ulps=2)
    _assert_within(vs, fv, ev)
    _assert_within(xs, fx, ex)


@settings(deadline=None, max_examples=10)
@given(problems(max_size=8, max_steps=100, max_work=400))
def test_naive_reference_stays_within_its_error_bound(problem):
    # The paper's multiply takes any digit in [0, n): an error of up to n ulps.
    xs, vs, fx, fv, ex, ev = _float_run(naive.NaiveReversibleMomentum, problem,
                                        decay_ulps=naive.BETA_DENOM)
    _assert_within(vs, fv, ev)
    _assert_within(xs, fx, ex)


@pytest.mark.parametrize("frac_bits", [52, 30, 60])
def test_one_step_is_accurate(frac_bits):
    """One step, checked with exact rationals in units of 2**-frac_bits (ulps).

    decay: ``|V' - (b V - (1-b) g)| <= 2 + 1/2 + eps (1-b) |g|`` ulps: the coder's
    digit ``k`` for ``V mod d = l`` satisfies ``k - l n / d in (-2, 2)`` (it decodes
    the slot ``l * 2**16 + w`` of a code with frequencies ~ 2**32 / n), then one
    rounding of ``(1-b) g``.  position: ``|X' - X - alpha V'| <= 1/2 + 2.0001 eps
    |alpha V'|`` ulps.
    """
    rng = np.random.default_rng(frac_bits)
    n_par = 1500
    limit = 2.0 ** (62 - frac_bits)
    v0 = rng.uniform(-1, 1, n_par) * limit * 2.0 ** -rng.integers(2, 40, n_par)
    x0 = rng.uniform(-1, 1, n_par) * limit / 4
    g = rng.standard_normal(n_par) * limit / 8 * 2.0 ** -rng.integers(0, 30, n_par)
    for beta in SPECIAL_BETAS:
        alpha = rng.uniform(0, 1, n_par)
        eng = ReversibleMomentum(x0, v0, frac_bits=frac_bits)
        s0 = eng.state
        eng.step(g, alpha, beta)
        s1 = eng.state
        n = int(beta_numerator(beta))
        b = Fraction(n, 1 << 16)
        worst_v = worst_x = 0.0
        for i in range(n_par):
            gi = Fraction(float(g[i])) * (1 << frac_bits)
            err_v = s1.v[i] - (b * int(s0.v[i]) - (1 - b) * gi)
            allowed = Fraction(5, 2) + Fraction(naive.EPS) * abs((1 - b) * gi)
            worst_v = max(worst_v, float(abs(err_v) / allowed))
            prod = Fraction(float(alpha[i])) * int(s1.v[i])
            err_x = int(s1.x[i]) - int(s0.x[i]) - prod
            allowed = Fraction(1, 2) + Fraction(2.0001 * naive.EPS) * abs(prod)
            worst_x = max(worst_x, float(abs(err_x) / allowed))
        assert worst_v <= 1.0, (beta, worst_v)
        assert worst_x <= 1.0, (beta, worst_x)


# ---------------------------------------------------------------- information


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_aux_bits_match_the_information_bound(beta):
    n_par, steps = 200, 2000
    rng = np.random.default_rng(1)
    eng = ReversibleMomentum(rng.standard_normal(n_par))
    naive.run_forward(eng, grad, [0.05] * steps, [beta] * steps)
    per = eng.aux_bits / (n_par * steps)
    assert per == pytest.approx(information_bound(beta), rel=0.01)


@pytest.mark.parametrize("beta, steps", [
    (0.5, 2000), (0.9, 2000),
    # At T=2000 beta=0.99 stores 29 bits (1.8 words) per parameter: 1 word plus the
    # coder state, and before each step the engine makes room for one more word, so
    # 2 rows = 32 bits, 10.4% over the bound.  The ratio falls as T grows (4.9% at
    # T=20000; 0.5 and 0.9 at T=2000: +3.2% and -0.0%).
    (0.99, 20000),
])
def test_allocated_bytes_approach_the_information_bound(beta, steps):
    n_par = 200 if steps <= 2000 else 16
    eng = ReversibleMomentum(np.random.default_rng(2).standard_normal(n_par))
    naive.run_forward(eng, grad, [0.05] * steps, [beta] * steps)
    per = eng.aux_nbytes * 8 / (n_par * steps)
    assert per == pytest.approx(information_bound(beta), rel=0.10)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99, 2.0**-16, "mixed"])
def test_aux_bits_match_the_python_integer_buffer(beta):
    n_par, steps = 10, 400
    rng = np.random.default_rng(3)
    if beta == "mixed":
        beta = rng.choice(SPECIAL_BETAS, n_par)
    x0 = rng.standard_normal(n_par)
    eng, ref = ReversibleMomentum(x0), naive.NaiveReversibleMomentum(x0)
    for e in (eng, ref):
        naive.run_forward(e, grad, [0.1] * steps, [beta] * steps)
    bound = steps * float(np.sum(np.broadcast_to(information_bound(beta), n_par)))
    # The engine counts log2 of its coder state plus its words: the bound, up to the
    # coder's loss (frequencies within 1 of 2**32 / n).
    assert eng.aux_bits == pytest.approx(bound, rel=1e-3, abs=1e-6)
    # log2(buf + 1) of the paper's buffer: buf is spread over [0, (d/n)**T), so its
    # log falls short of the information by about 1.44 bits a parameter (E log2 U).
    assert bound - 0.005 * bound - 4 * n_par <= ref.aux_bits <= bound + n_par
    assert eng.aux_bits == pytest.approx(ref.aux_bits, rel=0.005, abs=4 * n_par)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999, 2.0**-16, 1e-9, 1.0])
@pytest.mark.parametrize("held, steps", [(0, 3000), (50, 3000), (0, 5), (7, 1)])
def test_reserve_sizes_the_buffer_for_the_whole_run(beta, held, steps):
    n_par = 64
    eng = ReversibleMomentum(np.random.default_rng(4).standard_normal(n_par))
    naive.run_forward(eng, grad, [0.05] * held, [beta] * held)  # bits already held
    eng.reserve(steps, beta)
    words, nbytes = eng._words, eng.aux_nbytes
    pointer = words.__array_interface__["data"][0]
    naive.run_forward(eng, grad, [0.05] * steps, [beta] * steps)
    assert eng._words is words and eng.aux_nbytes == nbytes
    assert eng._words.__array_interface__["data"][0] == pointer
    # ... and it is not grossly oversized: at most 3 words over the information held
    assert eng._words.shape[0] <= eng.aux_bits / n_par / 16 + 4


def test_reserve_for_a_schedule_of_per_parameter_betas():
    n_par, steps = 40, 2000
    rng = np.random.default_rng(5)
    betas = rng.choice([2.0**-16, 0.5, 0.9, 1.0], (steps, n_par))
    eng = ReversibleMomentum(rng.standard_normal(n_par))
    eng.reserve(steps, betas)
    nbytes = eng.aux_nbytes
    naive.run_forward(eng, grad, [0.05] * steps, list(betas))
    assert eng.aux_nbytes == nbytes


def test_reserve_when_stacks_have_different_heights():
    n_par = 100
    beta = np.where(np.arange(n_par) < n_par // 2, 0.5, 1.0)  # 1 bit a step, or none
    eng = ReversibleMomentum(np.zeros(n_par))
    naive.run_forward(eng, grad, [0.01] * 320, [beta] * 320)
    eng.reserve(320, beta)
    nbytes = eng.aux_nbytes
    naive.run_forward(eng, grad, [0.01] * 320, [beta] * 320)
    assert eng.aux_nbytes == nbytes


# ---------------------------------------------------------------- rounding


def _ties_and_randoms(rng, count):
    """Floats (already scaled) of every magnitude, with many exact .5 ties."""
    k = rng.integers(-2**51, 2**51, count).astype(np.float64)
    ties = k + 0.5
    small_ties = rng.integers(-1000, 1000, count) + 0.5
    mags = rng.uniform(-1, 1, count) * 2.0 ** rng.integers(-60, 62, count)
    ints = rng.integers(-2**62, 2**62, count).astype(np.float64)
    y = np.concatenate([ties, small_ties, mags, ints,
                        [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, -0.0, 0.0, 2.0**52 - 0.5]])
    return y[np.abs(y) < 2.0**62]


def test_fixed_round_rounds_half_up():
    rng = np.random.default_rng(6)
    for y in _ties_and_randoms(rng, 2000):
        value, ok = _arith.fixed_round(float(y))
        assert ok and value == naive.round_half_up(float(y)), y
    for y in (2.0**62, -2.0**62, 1e300, math.inf, -math.inf, math.nan):
        value, ok = _arith.fixed_round(y)
        assert not ok and value == 0, y
    assert _arith.fixed_round(np.nextafter(2.0**62, 0))[1]


@pytest.mark.parametrize("frac_bits", [0, 20, 52, 60])
def test_compiled_rounding_agrees_with_the_rule(frac_bits):
    rng = np.random.default_rng(frac_bits)
    scaled = _ties_and_randoms(rng, 3000)
    x0 = scaled / 2.0**frac_bits  # exact: a power-of-two scaling
    x0 = x0[np.abs(scaled) < 2.0**62]
    v0 = -x0[::-1]
    state = ReversibleMomentum(x0, v0, frac_bits=frac_bits).state
    want = [naive.to_fixed(a, frac_bits) for a in x0]
    got = state.x.tolist()
    bad = [(a, w, h) for a, w, h in zip(x0, want, got) if w != h]
    assert not bad, bad[:5]
    assert state.v.tolist() == [naive.to_fixed(a, frac_bits) for a in v0]


@settings(deadline=None, max_examples=200)
@given(st.floats(-2.0**62, 2.0**62, exclude_min=True, exclude_max=True))
def test_fixed_round_matches_the_reference(y):
    value, ok = _arith.fixed_round(y)
    assert ok and value == naive.round_half_up(y)


def test_beta_numerator_and_bound():
    rng = np.random.default_rng(7)
    betas = np.concatenate([SPECIAL_BETAS, rng.uniform(0, 1, 1000),
                            (rng.integers(0, 2**16, 200) + 0.5) / 2**16])
    betas = betas[betas > 0]
    want = np.array([naive.beta_numerator(b) for b in betas])
    assert np.array_equal(beta_numerator(betas), want)
    assert np.array_equal(effective_beta(betas), want / 2**16)
    assert np.allclose(information_bound(betas), np.log2(2**16 / want), rtol=0, atol=1e-12)
    assert information_bound(1.0) == 0.0 and information_bound(1e-9) == 15.0


# ---------------------------------------------------------------- coder helpers


def test_word_stack_below_the_bottom():
    words = np.zeros((2, 3), dtype=np.uint16)
    h = np.int64(0)
    w, h = _arith.stack_pop(words, h, 1)  # empty: a zero word, height -1
    assert (w, h) == (0, -1)
    w, h = _arith.stack_pop(words, h, 1)
    assert (w, h) == (0, -2)
    h2, ok = _arith.stack_push(words, h, 1, np.uint64(7))  # nonzero below the bottom
    assert not ok and h2 == -1
    h, ok = _arith.stack_push(words, h, 1, np.uint64(0))
    assert ok and h == -1
    h, ok = _arith.stack_push(words, h, 1, np.uint64(0))
    assert ok and h == 0
    for word in (0xBEEF, 0x0001):
        h, ok = _arith.stack_push(words, h, 1, np.uint64(word))
        assert ok
    assert words[:, 1].tolist() == [0xBEEF, 0x0001] and words[:, [0, 2]].sum() == 0
    _, ok = _arith.stack_push(words, h, 1, np.uint64(3))  # no room: refused
    assert not ok and words[:, 1].tolist() == [0xBEEF, 0x0001]
    for word in (0x0001, 0xBEEF, 0, 0):
        w, h = _arith.stack_pop(words, h, 1)
        assert w == word
    assert h == -2


class _Column:
    """One parameter's coder, driven through the _arith helpers in plain Python."""

    def __init__(self, v, frac_bits=52, rows=64):
        self.v = np.int64(v)
        self.state = _arith.STATE_INIT
        self.height = np.int64(0)
        self.words = np.zeros((rows, 1), dtype=np.uint16)
        self.scale = 2.0**frac_bits

    def forward(self, g, n):
        omb, q, r, iq, iq1, _ = _arith.beta_constants(n)
        with np.errstate(over="ignore"):  # an overflowing step wraps, then is refused
            v, state, word, spill, ok = _arith.forward_velocity(
                self.v, self.state, g, omb, np.int64(n), q, r, iq, iq1, self.scale)
        if not ok:
            return False
        if spill:
            height, ok = _arith.stack_push(self.words, self.height, 0, word)
            if not ok:  # a nonzero word below the bottom: refused, nothing changed
                return False
            self.height = height
        self.v, self.state = v, state
        return True

    def reverse(self, g, n):
        omb, q, r, iq, iq1, inv_n = _arith.beta_constants(n)
        with np.errstate(over="ignore"):
            v, state, fill, ok = _arith.reverse_velocity(
                self.v, self.state, g, omb, np.int64(n), q, r, iq, iq1, inv_n, self.scale)
        if not ok:
            return False
        if fill:
            word, self.height = _arith.stack_pop(self.words, self.height, 0)
            state |= word
        self.v, self.state = v, state
        return True

    def key(self):
        live = self.words[:max(int(self.height), 0), 0].tolist()
        return int(self.v), int(self.state), int(self.height), live


_OPS = st.lists(st.tuples(st.booleans(), st.floats(-4, 4),
                          st.integers(2, 1 << 16)), max_size=60)


@settings(deadline=None, max_examples=150)
@given(st.integers(-2**56, 2**56), _OPS)
def test_coder_is_exact_from_the_initial_state(v0, ops):
    """Any sequence of forward/reverse element steps, then its inverse, from STATE_INIT.

    Reverse steps first pop from the empty stack (zero words, negative heights);
    the only step the coder refuses is a push of a nonzero word below the bottom,
    which no inverse sequence ever makes.
    """
    col = _Column(v0)
    keys, done = [col.key()], []
    for forward, g, n in ops:
        before = col.key()
        if not (col.forward(g, n) if forward else col.reverse(g, n)):
            assert col.key() == before  # a refused element step changes nothing
            continue
        done.append((forward, g, n))
        keys.append(col.key())
    for forward, g, n in reversed(done):
        keys.pop()
        assert (col.reverse(g, n) if forward else col.forward(g, n))
        assert col.key() == keys[-1]
    assert col.key() == (v0, int(_arith.STATE_INIT), 0, [])


@settings(deadline=None, max_examples=100)
@given(st.integers(-2**30, 2**30), st.lists(st.tuples(st.floats(-1, 1),
                                                       st.integers(2, 1 << 15)),
                                             min_size=1, max_size=40))
def test_coder_sequences_that_start_by_popping(v0, ops):
    """Reverse steps from STATE_INIT borrow words from the empty stack; undone exactly.

    Each reverse step multiplies v by up to 2**15, so a sequence runs until v would
    leave the range (refused, and the sequence stops there).
    """
    col = _Column(v0, frac_bits=20)
    done = []
    for g, n in ops:
        if not col.reverse(g, n):
            break
        done.append((g, n))
    assert done and col.height < 0  # the first step fits, and borrows a word
    for g, n in reversed(done):
        assert col.forward(g, n)
    assert col.key() == (v0, int(_arith.STATE_INIT), 0, [])


# ---------------------------------------------------------------- refused calls

#: Four kernel chunks of 12,500 (engine.CHUNK is 2**14); BAD lies in the second and
#: LATER in the fourth, so a refused call has updated, and must roll back, elements
#: on both sides of the one it refuses, in several chunks.
N_BIG, BAD, LATER = 50_000, 20_000, 45_000


def _num(text):
    """A regex for a number in a message, also when NumPy 2 writes it as np.float64(...)."""
    return rf"(?:np\.float64\()?{re.escape(text)}\)?"


def _with(value, changes, n=N_BIG):
    """A per-parameter float array equal to ``value`` but for ``changes`` {index: value}."""
    out = np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)))
    for i, c in changes.items():
        out[i] = c
    return out


def _refused_steps(g, alpha, beta):
    """(label, call, exception, message pattern) for step() calls the engine must refuse."""
    nan_g = _with(g, {LATER: np.nan, BAD: np.nan})
    return [
        ("nan g", lambda e: e.step(nan_g, alpha, beta), FloatingPointError,
         rf"g\[{BAD}\] = nan is not finite"),
        ("inf g", lambda e: e.step(_with(g, {BAD: -np.inf}), alpha, beta),
         FloatingPointError, rf"g\[{BAD}\] = -inf is not finite"),
        ("huge g", lambda e: e.step(_with(g, {BAD: 1e30, LATER: 1e30}), alpha, beta),
         OverflowError, rf"step overflows .* at parameter {BAD} \(.*g={_num('1e+30')}"),
        ("huge alpha", lambda e: e.step(g, _with(alpha, {BAD: 1e30}), beta), OverflowError,
         rf"step overflows .* at parameter {BAD} \(.*alpha={_num('1e+30')}"),
        ("nan alpha", lambda e: e.step(g, _with(alpha, {BAD: np.nan}), beta),
         FloatingPointError, rf"alpha\[{BAD}\] = nan is not finite"),
        ("inf alpha", lambda e: e.step(g, np.inf, beta), FloatingPointError,
         r"alpha = inf is not finite"),
        ("beta > 1", lambda e: e.step(g, alpha, _with(beta, {BAD: 1.5})), ValueError,
         rf"beta\[{BAD}\] = 1.5 is outside \(0, 1\]"),
        ("beta = 0", lambda e: e.step(g, alpha, _with(beta, {BAD: 0.0})), ValueError,
         rf"beta\[{BAD}\] = 0.0 is outside \(0, 1\]"),
        ("beta < 0", lambda e: e.step(g, alpha, -0.5), ValueError,
         r"beta = -0.5 is outside \(0, 1\]"),
        ("nan beta", lambda e: e.step(g, alpha, _with(beta, {BAD: np.nan})),
         FloatingPointError, rf"beta\[{BAD}\] = nan is not finite"),
        ("short g", lambda e: e.step(g[:-1], alpha, beta), ValueError,
         rf"g has length {N_BIG - 1}, expected {N_BIG}"),
        ("2-D g", lambda e: e.step(g[None, :], alpha, beta), ValueError,
         r"g must be a 1-D array"),
        ("long alpha", lambda e: e.step(g, np.zeros(N_BIG + 1), beta), ValueError,
         rf"alpha must be a scalar or have shape \({N_BIG},\), got shape \({N_BIG + 1},\)"),
        ("2-D beta", lambda e: e.step(g, alpha, np.full((1, N_BIG), 0.5)), ValueError,
         rf"beta must be a scalar or have shape \({N_BIG},\)"),
        ("text g", lambda e: e.step(g.astype(str), alpha, beta), TypeError,
         r"g must be a real numeric array, got dtype <U"),
        ("complex g", lambda e: e.step(g.astype(complex), alpha, beta), TypeError,
         r"g must be a real numeric array, got dtype complex128"),
        ("complex alpha", lambda e: e.step(g, 0.1 + 0j, beta), TypeError,
         r"alpha must be real, got dtype complex128"),
        ("text beta", lambda e: e.step(g, alpha, "0.5"), TypeError, r"beta must be real"),
    ]


def _assert_refused(eng, call, exc, pattern, label):
    before, iterations = eng.state, eng.iterations
    with pytest.raises(exc, match=pattern):
        call(eng)
    assert_same_state(eng.state, before)
    assert eng.iterations == iterations, label
    assert not eng._status.any(), f"{label}: status left dirty"  # read by the next call


@pytest.fixture(params=["serial", "parallel"])
def kernels(request, monkeypatch):
    """Force the serial kernels, or the parallel (prange) ones, whatever the size."""
    monkeypatch.setattr(_cpu_kernels, "FORCE_BUILD", request.param)
    return request.param


def test_refused_calls_in_a_run_change_nothing(kernels):
    rng = np.random.default_rng(9)
    x0 = rng.standard_normal(N_BIG)
    # per-parameter betas, small ones included: many words move to and from stacks
    beta = _with(rng.choice([0.01, 0.3, 0.5, 0.9, 1.0], N_BIG), {BAD: 0.01})
    alpha = rng.uniform(0.01, 0.2, N_BIG)
    steps = 8
    eng = ReversibleMomentum(x0)
    start = eng.state
    alphas, betas = [alpha] * steps, [beta] * steps
    naive.run_forward(eng, grad, alphas[:4], betas[:4])
    assert eng.state.height.max() > 0 and eng.state.height[:BAD].max() > 0

    g = grad(eng.x, 4)
    for label, call, exc, pattern in _refused_steps(g, alpha, beta):
        _assert_refused(eng, call, exc, pattern, label)
    naive.run_forward(eng, lambda x, t: grad(x, t + 4), alphas[4:], betas[4:])

    # reverse pass, with refused calls in the middle of the last reverse step
    naive.run_reverse(eng, lambda x, t: grad(x, t + 1), alphas[1:], betas[1:])
    _assert_refused(eng, lambda e: e.unstep_velocity(grad(e.x, 0), beta), RuntimeError,
                    r"unstep_velocity must follow unstep_position", "early velocity")
    _assert_refused(eng, lambda e: e.unstep_position(_with(alpha, {BAD: 1e30})),
                    OverflowError, rf"unstep_position overflows .* at parameter {BAD}",
                    "huge alpha")
    _assert_refused(eng, lambda e: e.unstep_position(_with(alpha, {BAD: np.inf})),
                    FloatingPointError, rf"alpha\[{BAD}\] = inf is not finite", "inf alpha")
    eng.unstep_position(alpha)
    g = grad(eng.x, 0)
    for label, call, exc, pattern in [
        ("step", lambda e: e.step(g, alpha, beta), RuntimeError,
         r"unstep_position was called without its unstep_velocity"),
        ("twice", lambda e: e.unstep_position(alpha), RuntimeError,
         r"unstep_position called twice"),
        ("nan g", lambda e: e.unstep_velocity(_with(g, {BAD: np.nan, LATER: 1.0}), beta),
         FloatingPointError, rf"g\[{BAD}\] = nan is not finite"),
        ("huge g", lambda e: e.unstep_velocity(_with(g, {BAD: 1e30}), beta),
         OverflowError, rf"unstep_velocity overflows .* at parameter {BAD}"),
        # (v + (1-b) g) / b leaves the range although (1-b) g fits
        ("division", lambda e: e.unstep_velocity(_with(g, {BAD: 500.0}), beta),
         OverflowError, rf"unstep_velocity overflows .* at parameter {BAD} .*beta="
                        + _num(repr(float(effective_beta(0.01))))),
        ("beta", lambda e: e.unstep_velocity(g, _with(beta, {BAD: 2.0})), ValueError,
         rf"beta\[{BAD}\] = 2.0 is outside"),
        ("short g", lambda e: e.unstep_velocity(g[:10], beta), ValueError,
         rf"g has length 10, expected {N_BIG}"),
    ]:
        _assert_refused(eng, call, exc, pattern, label)
    eng.unstep_velocity(g, beta)
    assert_same_state(eng.state, start)
    assert eng.aux_bits == 0.0 and eng.iterations == 0
    _assert_refused(eng, lambda e: e.unstep_position(alpha), ValueError,
                    r"no step left to undo", "one too many")


def test_protocol_errors():
    eng = ReversibleMomentum(np.linspace(-1, 1, 7))
    for label, call, exc, pattern in [
        ("undo at start", lambda e: e.unstep_position(0.1), ValueError, r"no step left"),
        ("velocity first", lambda e: e.unstep_velocity(np.zeros(7), 0.5), RuntimeError,
         r"must follow unstep_position"),
    ]:
        _assert_refused(eng, call, exc, pattern, label)
    eng.step(grad(eng.x, 0), 0.1, 0.5)
    eng.unstep_position(0.1)
    _assert_refused(eng, lambda e: e.unstep_position(0.1), RuntimeError, r"twice", "twice")
    _assert_refused(eng, lambda e: e.step(np.zeros(7), 0.1, 0.5), RuntimeError,
                    r"unstep_position was called without", "step")
    eng.unstep_velocity(grad(eng.x, 0), 0.5)
    assert eng.iterations == 0 and eng.aux_bits == 0.0


def test_overflow_of_the_velocity_sum():
    """b v - (1-b) g leaves the range though each term fits."""
    v0 = np.zeros(5)
    v0[2] = 1000.0  # the range is |v| < 2**10 at frac_bits=52
    eng = ReversibleMomentum(np.zeros(5), v0)
    g = np.zeros(5)
    g[2] = -5000.0  # (1 - 0.99) g = -50 fits, 0.99 * 1000 + 50 does not
    _assert_refused(eng, lambda e: e.step(g, 0.0, 0.99), OverflowError,
                    rf"step overflows the fixed-point range at parameter 2 "
                    rf".*v={_num('1000.0')}", "v")
    _assert_refused(eng, lambda e: e.step(np.full(5, -1.0), 1e4, 0.5), OverflowError,
                    r"step overflows the fixed-point range at parameter 0", "x")


def test_refused_construction():
    big = _with(0.0, {BAD: 1024.0, LATER: 2048.0})
    with pytest.raises(OverflowError, match=rf"x0\[{BAD}\] = {_num('1024.0')} leaves the "
                       r"fixed-point range: with frac_bits=52, \|x\| and \|v\| must stay "
                       r"below 2\*\*10"):
        ReversibleMomentum(big)
    ReversibleMomentum(_with(0.0, {BAD: 1024.0 - 2.0**-42}))  # the largest that fits
    with pytest.raises(OverflowError, match=rf"v0\[{BAD}\] = {_num('-1024.0')}"):
        ReversibleMomentum(np.zeros(N_BIG), -big)
    with pytest.raises(OverflowError, match=rf"x0\[1\] = {_num('5.0')} .* below 2\*\*2"):
        ReversibleMomentum([0.0, 5.0], frac_bits=60)
    with pytest.raises(FloatingPointError, match=rf"x0\[{BAD}\] = nan is not finite"):
        ReversibleMomentum(_with(0.0, {BAD: np.nan}))
    with pytest.raises(ValueError, match=r"v0 has length 3, expected 2"):
        ReversibleMomentum([0.0, 1.0], np.zeros(3))
    with pytest.raises(ValueError, match=r"x0 must be a 1-D array"):
        ReversibleMomentum(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"at least one parameter"):
        ReversibleMomentum(np.zeros(0))
    with pytest.raises(TypeError, match=r"x0 must be a real numeric array, got dtype <U"):
        ReversibleMomentum(["a", "b"])
    for frac_bits in (-1, 61, 1.5):
        with pytest.raises(ValueError, match=r"frac_bits must be an integer in \[0, 60\]"):
            ReversibleMomentum(np.zeros(2), frac_bits=frac_bits)


def test_refused_step_after_borrowing_changes_nothing():
    # Undoing with a smaller beta than the step used is a misuse, but a legal call:
    # it takes more bits than the step stored, borrowing zero words (height -3).
    eng = ReversibleMomentum(np.zeros(1))
    for _ in range(3):
        eng.step(np.zeros(1), 0.0, 1.0)
    for _ in range(3):
        eng.unstep_position(0.0)
        eng.unstep_velocity(np.zeros(1), 1e-9)
    assert eng.state.height[0] == -3
    rng = np.random.default_rng(1)
    for _ in range(200):  # the first word pushed below the bottom that is not 0
        before = eng.state
        try:
            eng.step(rng.standard_normal(1), 0.01, 0.5)
        except RuntimeError as err:  # refused by name, and nothing may have changed
            assert "overdrawn" in str(err)
            assert_same_state(eng.state, before)
            return
    raise AssertionError("no step was refused")


def _assert_whole_state_equal(a, b, label=""):
    """Every field of two EngineStates equal, dtype, shape and bits (free rows included)."""
    for name in EngineState._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (
            f"{label}: {name} differs" + (f" in {int(np.sum(x != y))} cells"
                                          if x.shape == y.shape else f", {x.shape} vs {y.shape}"))


def _refusals(rng, eng, g, alpha, beta):
    """(label, call, exception) for one refused forward step, at a random parameter."""
    i = int(rng.integers(eng.size))
    kinds = [
        ("huge g", lambda e: e.step(_with(g, {i: 1e300}, e.size), alpha, beta), OverflowError),
        ("nan g", lambda e: e.step(_with(g, {i: np.nan}, e.size), alpha, beta),
         FloatingPointError),
        ("huge alpha", lambda e: e.step(g, _with(alpha, {i: 1e30}, e.size), beta),
         OverflowError),
        ("huge v", lambda e: e.step(_with(g, {i: -1e5}, e.size), alpha, beta), OverflowError),
    ]
    return kinds[int(rng.integers(len(kinds)))]


@pytest.mark.parametrize("seed", range(3))
def test_refused_calls_in_a_random_run_leave_the_whole_state_equal(seed, kernels):
    """Defect 7: a refused step rolled back its pushes, but the popped words stayed in the
    rows above the stacks' tops, and ``state.words`` showed them."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20_000, 40_000)) if seed else 500  # several kernel chunks, or one
    beta = rng.uniform(0.3, 0.6, n)
    alpha = rng.uniform(0.01, 0.1, n)
    eng = ReversibleMomentum(rng.standard_normal(n))  # no reserve: refusals meet growth
    start = eng.state
    taken = []  # the gradients of the steps taken, to undo them
    refused = highest = 0

    def refuse(label, call, exc):
        nonlocal refused
        before, nbytes, iterations = eng.state, eng.aux_nbytes, eng.iterations
        with pytest.raises(exc):
            call(eng)
        _assert_whole_state_equal(eng.state, before, f"{label} at call {t}")
        assert eng.aux_nbytes == nbytes and eng.iterations == iterations, label
        assert not eng._status.any(), f"{label}: status left dirty"
        refused += 1

    for t in range(160):
        g = grad(eng.x, t)
        if rng.random() < 0.3:
            refuse(*_refusals(rng, eng, g, alpha, beta))
        if taken and rng.random() < 0.3:  # a reverse step, refused calls in its middle
            g_back = taken.pop()
            if rng.random() < 0.3:
                refuse("huge alpha back", lambda e: e.unstep_position(
                    _with(alpha, {int(rng.integers(n)): 1e30}, n)), OverflowError)
            eng.unstep_position(alpha)
            if rng.random() < 0.3:
                refuse("huge g back", lambda e: e.unstep_velocity(
                    _with(g_back, {int(rng.integers(n)): 1e300}, n), beta), OverflowError)
            eng.unstep_velocity(g_back, beta)
        else:
            eng.step(g, alpha, beta)
            taken.append(g)
        highest = max(highest, int(eng._height.max()))
    assert refused >= 40 and highest >= 2
    while taken:  # reversal stays exact
        eng.unstep_position(alpha)
        eng.unstep_velocity(taken.pop(), beta)
    _assert_whole_state_equal(eng.state, start, "back at the start")
    assert eng.aux_bits == 0.0


def test_refused_step_at_step_24_changes_no_word():
    """The case of the report: betas in [0.3, 0.6], g = 1e300 at step 24."""
    rng = np.random.default_rng(24)
    n = 1000
    eng = ReversibleMomentum(rng.standard_normal(n))
    beta = rng.uniform(0.3, 0.6, n)
    for t in range(24):
        eng.step(grad(eng.x, t), 0.1, beta)
    before = eng.state
    with pytest.raises(OverflowError, match="step overflows the fixed-point range at "
                                            "parameter 500"):
        eng.step(_with(grad(eng.x, 24), {500: 1e300}, n), 0.1, beta)
    _assert_whole_state_equal(eng.state, before, "refused step 24")


def test_refused_step_does_not_grow_the_buffer():
    """A step that finds its stacks full and is refused leaves the allocation as it was."""
    n = 64
    eng = ReversibleMomentum(np.zeros(n))  # equal columns: all full at once
    g, bad = np.full(n, 0.5), _with(0.5, {n - 1: 1e300}, n)
    grew = 0
    for _ in range(40):  # 16 bits a step: a word every step
        before, nbytes = eng.state, eng.aux_nbytes
        with pytest.raises(OverflowError, match=f"at parameter {n - 1}"):
            eng.step(bad, 0.1, 1e-9)
        assert eng.aux_nbytes == nbytes
        _assert_whole_state_equal(eng.state, before, "refused")
        eng.step(g, 0.1, 1e-9)
        grew += eng.aux_nbytes > nbytes
    assert grew >= 5  # the steps that were taken did grow it


def test_state_words_are_zero_above_every_stack():
    rng = np.random.default_rng(8)
    n = 300
    beta = rng.uniform(0.01, 1.0, n)  # stacks of many heights
    eng = ReversibleMomentum(rng.standard_normal(n))
    gs = [grad(eng.x, 0)]
    for t in range(60):
        eng.step(gs[-1], 0.1, beta)
        gs.append(grad(eng.x, t + 1))
    for t in range(30):  # popped words stay in memory above the new tops
        eng.unstep_position(0.1)
        eng.unstep_velocity(gs[-2 - t], beta)
    s = eng.state
    assert s.words.shape[0] == max(s.height.max(), 0)
    free = np.arange(s.words.shape[0])[:, None] >= s.height[None, :]
    assert free.any() and not s.words[free].any()
    live = ~free
    assert np.array_equal(s.words[live], eng._words[:s.words.shape[0]][live])


# ---------------------------------------------------------------- prepared coefficients


@pytest.mark.parametrize("per_param", [False, True], ids=["scalar", "per-parameter"])
def test_prepared_coefficients_take_the_same_steps(per_param):
    rng = np.random.default_rng(5)
    n, steps = 300, 40
    x0 = rng.standard_normal(n)
    alpha = rng.uniform(0.05, 0.2, n) if per_param else 0.1
    beta = rng.uniform(0.3, 0.99, n) if per_param else 0.83
    raw, prepared = ReversibleMomentum(x0), ReversibleMomentum(x0)
    alpha_p, beta_p = prepared.prepare_alpha(alpha), prepared.prepare_beta(beta)
    for t in range(steps):
        raw.step(grad(raw.x, t), alpha, beta)
        prepared.step(grad(prepared.x, t), alpha_p, beta_p)
    assert_same_state(prepared.state, raw.state)
    for t in reversed(range(steps)):
        prepared.unstep_position(alpha_p)
        prepared.unstep_velocity(grad(prepared.x, t), beta_p)
    assert_same_state(prepared.state, ReversibleMomentum(x0).state)


def test_prepared_coefficients_are_checked():
    eng, other = ReversibleMomentum(np.zeros(4)), ReversibleMomentum(np.zeros(5))
    with pytest.raises(ValueError, match=r"beta\[2\] = 1.5 is outside \(0, 1\]"):
        eng.prepare_beta(np.array([0.5, 0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        eng.prepare_alpha(np.ones(5))
    for label, call, pattern in [
        ("alpha as beta", lambda e: e.step(np.zeros(4), 0.1, e.prepare_alpha(0.5)),
         "beta was prepared as alpha"),
        ("other size", lambda e: e.step(np.zeros(4), other.prepare_alpha(0.1), 0.5),
         "engine of size 5; this is alpha for size 4"),
    ]:
        _assert_refused(eng, call, ValueError, pattern, label)


def test_hand_built_prepared_values_are_refused():
    """Defect 9: ``Prepared`` is public, and a hand-built one reached the kernels
    unvalidated (``Prepared("beta", N, 0, 0)`` raised ZeroDivisionError)."""
    n = 6
    eng = ReversibleMomentum(np.zeros(n))
    eng.step(np.ones(n), 0.1, 0.5)
    made_beta, made_alpha = eng.prepare_beta(0.5), eng.prepare_alpha(0.1)
    g = np.ones(n)
    for label, call in [
        ("beta 0", lambda e: e.step(g, 0.1, Prepared("beta", n, 0, 0))),
        ("beta 2**20", lambda e: e.step(g, 0.1, Prepared("beta", n, 1 << 20, 1 << 20))),
        ("beta table", lambda e: e.step(g, 0.1, Prepared("beta", n, np.zeros(n, np.int64),
                                                          made_beta.kernel_arg))),
        ("alpha nan", lambda e: e.step(g, Prepared("alpha", n, None, np.nan), 0.5)),
        ("replaced", lambda e: e.step(g, made_alpha._replace(kernel_arg=np.inf), 0.5)),
        ("made", lambda e: e.step(g, 0.1, Prepared._make(made_beta))),
        ("reverse", lambda e: e.unstep_position(Prepared("alpha", n, None, 1e30))),
        ("prepare again", lambda e: e.prepare_beta(Prepared("beta", n, 0, 0))),
    ]:
        _assert_refused(eng, call, TypeError, r"is a Prepared that no engine made", label)
    # the values prepare_* made still work, also copied and pickled
    import copy
    import pickle

    twin = ReversibleMomentum(np.zeros(n))
    twin.step(np.ones(n), 0.1, 0.5)
    for alpha, beta in [(made_alpha, made_beta), copy.deepcopy((made_alpha, made_beta)),
                        pickle.loads(pickle.dumps((made_alpha, made_beta)))]:
        eng.step(g, alpha, beta)
        twin.step(g, 0.1, 0.5)
    assert_same_state(eng.state, twin.state)


def test_prepared_alpha_keeps_what_was_validated():
    n = 5
    alpha = np.full(n, 0.1)
    eng, twin = ReversibleMomentum(np.zeros(n)), ReversibleMomentum(np.zeros(n))
    prepared = eng.prepare_alpha(alpha)
    alpha[2] = 1e30  # the caller's array changes after validation
    eng.step(np.ones(n), prepared, 0.5)
    twin.step(np.ones(n), 0.1, 0.5)
    assert_same_state(eng.state, twin.state)


@pytest.mark.parametrize("beta, pattern", [
    (np.nan, r"beta = nan is not finite"),
    (0.0, r"beta = 0.0 is outside \(0, 1\]"),
    (7.0, r"beta = 7.0 is outside \(0, 1\]"),
    (-np.inf, r"beta = -inf is not finite"),
    (np.array([0.5, 0.9, np.nan, 0.5]), r"beta\[2\] = nan is not finite"),
    (np.array([[0.5] * 4, [0.5, 0.5, 0.5, 1.5], [0.5] * 4]), r"beta\[1, 3\] = 1.5 is outside"),
    (np.full(5, 0.5), r"beta must be a scalar or have shape \(4,\), \(3,\), \(3, 4\) or "
                      r"\(3, 1\), got shape \(5,\)"),
    (np.full((3, 2), 0.5), r"got shape \(3, 2\)"),
    (np.full((3, 4, 1), 0.5), r"got shape \(3, 4, 1\)"),
])
def test_reserve_refuses_bad_betas(beta, pattern):
    """Defect 9: reserve() took beta NaN, 0 and 7 (and sized the stacks from them)."""
    eng = ReversibleMomentum(np.zeros(4))
    with pytest.raises(ValueError, match=pattern):
        eng.reserve(3, beta)
    assert eng.aux_nbytes == 0
    eng.reserve(3, np.full((3, 1), 0.5))  # the shapes it takes
    eng.reserve(3, np.full((3, 4), 0.5))
    eng.reserve(3, np.full(3, 0.5))
    eng.reserve(0, np.zeros((0, 4)) + 0.5)


@pytest.mark.parametrize("iterations", [-1, 2.0, 1.5, True, "3", None, np.float64(3)])
def test_reserve_refuses_bad_iterations(iterations):
    eng = ReversibleMomentum(np.zeros(4))
    with pytest.raises(ValueError, match=r"iterations must be an integer >= 0, got "
                       + re.escape(repr(iterations))):
        eng.reserve(iterations, 0.5)
    assert eng.aux_nbytes == 0
    eng.reserve(np.int64(100), 0.5)  # 100 bits: 6 words
    assert eng.aux_nbytes == 6 * 4 * 2


@pytest.mark.parametrize("frac_bits", [True, False, np.bool_(True), 1.0, 52.0, "52", None,
                                       -1, 61])
def test_frac_bits_must_be_an_integer_in_range_in_both_engines(frac_bits):
    """Defect 9: frac_bits=True was taken as 1."""
    from hypergrad_fast import BatchedReversibleMomentum

    pattern = r"frac_bits must be an integer in \[0, 60\], got " + re.escape(repr(frac_bits))
    with pytest.raises(ValueError, match=pattern):
        ReversibleMomentum(np.zeros(2), frac_bits=frac_bits)
    # checked before the GPU is looked for, so this holds on any machine
    with pytest.raises(ValueError, match=pattern):
        BatchedReversibleMomentum(np.zeros((1, 2)), frac_bits=frac_bits)
    assert ReversibleMomentum(np.zeros(2), frac_bits=np.int32(7)).frac_bits == 7
