"""Bits the information buffer holds, against the entropy bound log2(2**16 / n) ~ log2(1/beta).

N = 1000 parameters (small, so 10**4 steps take well under a second per beta; the
bits per parameter do not depend on N), T = 10**4 steps on a seeded diagonal
quadratic, alpha = 0.1, storage reserved up front with ``reserve(T, beta)`` as
``sgd`` does.
"""

from .common import ALPHA, quadratic_gradient, vector_problem

N = 1000
T = 10**4


def run_engine(beta, n=N, n_iter=T):
    """(aux_bits, aux_nbytes) after ``n_iter`` steps at ``beta`` on ``n`` parameters."""
    from hypergrad_fast import ReversibleMomentum

    x0, _ = vector_problem(n)
    grad = quadratic_gradient(n)
    engine = ReversibleMomentum(x0)
    engine.reserve(n_iter, beta)
    for _ in range(n_iter):
        engine.step(grad(engine.x), ALPHA, beta)
    return engine.aux_bits, engine.aux_nbytes


class BufferBits:
    """Stored bits per parameter per iteration, and their ratio to the bound."""

    params = [0.5, 0.9, 0.99]
    param_names = ["beta"]

    def setup_cache(self):
        return {beta: run_engine(beta) for beta in self.params}

    setup_cache.timeout = 300

    def setup(self, runs, beta):
        from hypergrad_fast import information_bound

        self.aux_bits, self.aux_nbytes = runs[beta]
        self.bound = float(information_bound(beta))

    def track_bits_per_param_iteration(self, runs, beta):
        """Information held, bits / (N * T)."""
        return self.aux_bits / (N * T)

    track_bits_per_param_iteration.unit = "bits"

    def track_bits_vs_bound(self, runs, beta):
        """Held bits / (N * T * information_bound(beta)): 1.0 is the entropy bound."""
        return self.aux_bits / (N * T * self.bound)

    track_bits_vs_bound.unit = "ratio"

    def track_allocated_vs_bound(self, runs, beta):
        """Allocated word-stack bytes * 8 / (N * T * bound): what reserve() sizes, rounded
        up to whole 16-bit words plus two words of slack per parameter."""
        return self.aux_nbytes * 8 / (N * T * self.bound)

    track_allocated_vs_bound.unit = "ratio"
