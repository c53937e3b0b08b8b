"""A short version of the asv measurements without asv: Markdown tables and PNG plots.

    python -m bench.report            # a few minutes on 2 cores
    python -m bench.report --quick    # about a minute
    python -m bench.report --out DIR  # default out/report (git-ignored)
    python -m bench.report --main-job 8   # the main job, compiled / autograd, 8 pairs

Writes ``report.md``, ``results.json``, ``time_vs_T.png`` and ``memory_vs_T.png``.

Step times are the minimum over repeats in this process.  Each hypergradient
configuration (implementation, T) runs in its own child process
(``bench/measure.py``), which reports its wall time (min of 2 runs) and its
peak resident set (``VmHWM`` of ``/proc/self/status``; see measure.py) -- both
after start-up ("ready": imports, data, JIT warm-up) and after the runs; the
difference is what the runs themselves added.  The Python-int buffer's memory
is the ``sys.getsizeof`` of its ints and list, measured at N = 1000 and scaled
to the seed network's N.
"""

import argparse
import copy
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import common
from .bench_bits import run_engine
from .bench_hypergrad import NAIVE_BYTES_PER_ITERATION
from .bench_steps import make_optimiser
from .measure import measure_in_child

MB = 1e6

FULL = {
    "step_sizes": (10**4, 10**5, 10**6),
    "python_int_max_n": 10**5,
    "prior_steps": (200, 2000, 6000),
    "bits_T": 10**4,
    "hyper_T": (10, 30, 100, 300, 1000),
    "naive_max_T": 300,
    "hyper_ratio_T": 100,
}
QUICK = {
    "step_sizes": (10**4, 10**5),
    "python_int_max_n": 10**4,
    "prior_steps": (200, 2000),
    "bits_T": 2000,
    "hyper_T": (10, 30, 100),
    "naive_max_T": 100,
    "hyper_ratio_T": 100,
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------ measurements


def step_times(sizes, python_int_max_n, repeats=15):
    """Forward and reverse step times (s) per implementation and N, after 10 steps."""
    rows = []
    for n in sizes:
        x0, g = common.vector_problem(n)
        for impl in ("ours", "numpy", "python_int"):
            if impl == "python_int" and n > python_int_max_n:
                continue
            reps = 3 if impl == "python_int" else repeats
            opt = make_optimiser(impl, x0, room=1000)
            for _ in range(10 + reps):  # warm-up, and steps for the reverse to undo
                opt.step(g, common.ALPHA, common.BETA)
            opt.unstep(g, common.ALPHA, common.BETA)  # JIT warm-up of the reverse
            fwd = common.best_of(lambda: opt.step(g, common.ALPHA, common.BETA), reps)
            rev = common.best_of(lambda: opt.unstep(g, common.ALPHA, common.BETA), reps)
            rows.append({"N": n, "impl": impl, "step_s": fwd, "reverse_s": rev})
            log(f"  step N={n:>8} {impl:<10} {fwd * 1e6:10.1f} us  reverse {rev * 1e6:10.1f} us")
    return rows


def step_time_vs_prior(prior_steps, n=10**4):
    """One forward step's time (s) after T prior steps, ours, numpy and python_int."""
    x0, g = common.vector_problem(n)
    rows = []
    for impl in ("ours", "numpy", "python_int"):
        opt = make_optimiser(impl, x0, room=max(prior_steps) + 1000)
        done = 0
        for n_prior in prior_steps:
            for _ in range(n_prior - done):
                opt.step(g, common.ALPHA, common.BETA)
            done = n_prior
            probe = copy.deepcopy(opt)
            reps = 3 if impl == "python_int" else 15
            seconds = common.best_of(lambda: probe.step(g, common.ALPHA, common.BETA), reps)
            rows.append({"N": n, "impl": impl, "T": n_prior, "step_s": seconds})
            log(f"  after T={n_prior:>6} {impl:<10} {seconds * 1e6:10.1f} us")
    return rows


def buffer_bits(n_iter, betas=(0.5, 0.9, 0.99), n=1000):
    from hypergrad_fast import information_bound

    rows = []
    for beta in betas:
        aux_bits, aux_nbytes = run_engine(beta, n=n, n_iter=n_iter)
        bound = float(information_bound(beta))
        rows.append({"beta": beta, "N": n, "T": n_iter, "bound": bound,
                     "bits_per_param_iter": aux_bits / (n * n_iter),
                     "allocated_vs_bound": aux_nbytes * 8 / (n * n_iter * bound)})
        log(f"  beta={beta}: {aux_bits / (n * n_iter):.4f} bits (bound {bound:.4f})")
    return rows


def python_int_buffer_bytes(n_iters, n=1000):
    """Bytes per parameter of the 2015 buffer (ints + list slots) after each T."""
    x0, g = common.vector_problem(n)
    opt = make_optimiser("python_int", x0)
    out, done = {}, 0
    for n_iter in sorted(n_iters):
        for _ in range(n_iter - done):
            opt.step(g, common.ALPHA, common.BETA)
        done = n_iter
        out[n_iter] = (sys.getsizeof(opt.bufs) + sum(map(sys.getsizeof, opt.bufs))) / n
    return out


def hypergrad_runs(n_iters, naive_max_t):
    rows = []
    for n_iter in n_iters:
        for impl in ("ours", "naive"):
            if impl == "naive" and n_iter > naive_max_t:
                continue
            run = measure_in_child(impl, n_iter, repeats=2)
            rows.append(run)
            added = (run["rss_peak"] - run["rss_ready"]) / MB
            log(f"  hypergrad T={n_iter:>5} {impl:<5} {run['seconds']:8.2f} s  peak "
                f"{run['rss_peak'] / MB:8.1f} MB (+{added:.1f})")
    return rows


def hypergrad_ratio(n_iter):
    """In-process time ratio ours / naive, value + all hypergradients: the smallest of
    3 runs each, taken in turn (as bench_ratios.HypergradVsNaive measures it)."""
    problem = common.seed_problem(n_iter)
    for impl in ("ours", "naive"):
        common.value_and_hypergrads(common.seed_problem(2), impl)
    times = common.alternating_best(
        {impl: functools.partial(common.value_and_hypergrads, problem, impl)
         for impl in ("naive", "ours")}, 3)
    return times["ours"] / times["naive"]


def hypergrad_ratio_in_child(n_iter):
    """:func:`hypergrad_ratio` in a fresh Python process.

    This process has by then run the N = 10^6 engine on both cores and held the
    naive reference's gigabytes; measured here, the ratio came out 1.29 where a
    fresh process gave 1.04-1.06 (three runs, same commit), as asv's own process per
    benchmark does.
    """
    code = f"from bench import report; print(report.hypergrad_ratio({int(n_iter)}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=True)
    return float(done.stdout.split()[-1])


# ------------------------------------------------------------ output


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _us(seconds):
    return "—" if seconds is None else f"{seconds * 1e6:,.0f} µs"


def markdown(res):
    from hypergrad_fast import information_bound

    out = [f"# hypergrad_fast benchmark report ({res['mode']})", "",
           f"{res['machine']}; {res['date']}. Step times: min over repeats in one process. "
           "Hypergradient runs: one child process each, time = min of 2 runs, peak "
           "memory = the child's peak resident set (VmHWM).", ""]

    by = {(r["N"], r["impl"]): r for r in res["steps"]}
    sizes = sorted({r["N"] for r in res["steps"]})
    rows = []
    for n in sizes:
        o, p, q = by[n, "ours"], by[n, "numpy"], by.get((n, "python_int"))
        rows.append([f"{n:,}", _us(o["step_s"]), _us(o["reverse_s"]), _us(p["step_s"]),
                     _us(q and q["step_s"]), _us(q and q["reverse_s"]),
                     f"{o['step_s'] / p['step_s']:.1f}", f"{o['reverse_s'] / p['step_s']:.1f}"])
    out += ["## One step (beta = 0.9, after 10 steps)", "",
            _table(["N", "ours step", "ours reverse", "NumPy step", "Python-int step",
                    "Python-int reverse", "ours/NumPy step", "ours reverse/NumPy step"], rows),
            "", "Python-int only up to "
            f"N = {res['config']['python_int_max_n']:,} (a Python loop over parameters).", ""]

    prior = {(r["T"], r["impl"]): r["step_s"] for r in res["prior"]}
    ts = sorted({r["T"] for r in res["prior"]})
    rows = [[f"{t:,}", _us(prior[t, "ours"]), _us(prior[t, "numpy"]),
             _us(prior[t, "python_int"]), f"{prior[t, 'python_int'] / prior[t, 'ours']:.0f}x"]
            for t in ts]
    out += ["## One forward step after T prior steps (N = 10,000)", "",
            _table(["T", "ours", "NumPy", "Python-int", "Python-int / ours"], rows), ""]

    rows = [[r["beta"], f"{r['bound']:.4f}", f"{r['bits_per_param_iter']:.4f}",
             f"{r['bits_per_param_iter'] / r['bound']:.4f}", f"{r['allocated_vs_bound']:.3f}"]
            for r in res["bits"]]
    t_bits = res["bits"][0]["T"]
    out += [f"## Information buffer (N = 1,000, T = {t_bits:,})", "",
            _table(["beta", "bound (bits/param/iter)", "held", "held / bound",
                    "allocated / bound"], rows), ""]

    hyper = {(r["T"], r["impl"]): r for r in res["hypergrad"]}
    n_params = res["hypergrad"][0]["n_params"]
    bound_bits = float(information_bound(common.BETA))
    rows = []
    for t in sorted({r["T"] for r in res["hypergrad"]}):
        o, nv = hyper[t, "ours"], hyper.get((t, "naive"))
        rows.append([f"{t:,}", f"{o['seconds']:.2f} s",
                     "—" if nv is None else f"{nv['seconds']:.2f} s",
                     f"{o['rss_peak'] / MB:.0f} MB",
                     "—" if nv is None else f"{nv['rss_peak'] / MB:.0f} MB",
                     f"{(o['rss_peak'] - o['rss_ready']) / MB:.1f} MB",
                     "—" if nv is None else f"{(nv['rss_peak'] - nv['rss_ready']) / MB:.0f} MB",
                     f"{n_params * t * bound_bits / 8 / MB:.2f} MB",
                     f"{res['python_int_bytes'][str(t)] * n_params / MB:.1f} MB"])
    out += [f"## Value + all hypergradients, seed network (N = {n_params:,}, batch 200)", "",
            _table(["T", "ours time", "naive time", "ours peak RSS", "naive peak RSS",
                    "ours run added", "naive run added", "information bound",
                    "Python-int buffer"], rows), "",
            "\"run added\" = peak RSS after the run minus peak RSS after start-up and warm-up. "
            "\"information bound\" = N T log2(1/beta) / 8 bytes; \"Python-int buffer\" = the "
            "2015 buffer's ints at this N (measured at N = 1,000, scaled). The naive "
            f"reference holds ~{NAIVE_BYTES_PER_ITERATION / MB:.1f} MB per iteration.", ""]

    r = res["ratios"]
    rows = [["our step / NumPy step", f"N = {r['n_numpy']:,}", f"{r['step_vs_numpy']:.2f}"],
            ["our reverse step / NumPy step", f"N = {r['n_numpy']:,}",
             f"{r['reverse_vs_numpy']:.2f}"],
            ["Python-int step / our step", "N = 10,000, T = 200",
             f"{r['python_int_vs_ours_T200']:.0f}"],
            ["our step after 2000 / after 200", "N = 10,000", f"{r['ours_T2000_vs_T200']:.2f}"],
            ["Python-int step after 2000 / after 200", "N = 10,000",
             f"{r['python_int_T2000_vs_T200']:.2f}"],
            ["hypergradients ours / naive",
             f"T = {r['hyper_T']}" + (" (child runs, min of 2)" if res["mode"] == "quick"
                                      else " (fresh process, min of 3 alternating)"),
             f"{r['hyper_ours_vs_naive']:.2f}"]]
    out += ["## Ratios (same process)", "", _table(["ratio", "where", "value"], rows), ""]
    return "\n".join(out)


def plots(res, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from hypergrad_fast import information_bound

    hyper = res["hypergrad"]
    n_params = hyper[0]["n_params"]
    series = {impl: sorted((r for r in hyper if r["impl"] == impl), key=lambda r: r["T"])
              for impl in ("ours", "naive")}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, style in (("ours", "o-"), ("naive", "s-")):
        rows = series[impl]
        ax1.plot([r["T"] for r in rows], [r["seconds"] for r in rows], style, label=impl)
    ax1.set(xscale="log", yscale="log", xlabel="T (iterations)", ylabel="seconds",
            title=f"value + all hypergradients, N = {n_params:,}")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    for impl, style in (("ours", "o-"), ("numpy", "^-"), ("python_int", "s-")):
        rows = sorted((r for r in res["prior"] if r["impl"] == impl), key=lambda r: r["T"])
        ax2.plot([r["T"] for r in rows], [r["step_s"] * 1e6 for r in rows], style,
                 label={"python_int": "Python-int buffer (2015)", "numpy": "NumPy (irreversible)"}
                 .get(impl, impl))
    ax2.set(xscale="log", yscale="log", xlabel="prior steps T", ylabel="µs per step",
            title="one forward step after T steps, N = 10,000")
    prior_ts = sorted({r["T"] for r in res["prior"]})
    ax2.set_xticks(prior_ts, [f"{t:,}" for t in prior_ts])
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.legend()
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "time_vs_T.png", dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    for impl, style in (("ours", "o-"), ("naive", "s-")):
        rows = series[impl]
        ax1.plot([r["T"] for r in rows], [r["rss_peak"] / MB for r in rows], style, label=impl)
    ax1.set(xscale="log", yscale="log", xlabel="T (iterations)", ylabel="MB",
            title="peak RSS of the whole process")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    floor = 0.01  # MB: log axes; a run that added less is drawn at the floor
    for impl, style in (("ours", "o-"), ("naive", "s-")):
        rows = series[impl]
        ax2.plot([r["T"] for r in rows],
                 [max((r["rss_peak"] - r["rss_ready"]) / MB, floor) for r in rows], style,
                 label=f"{impl}: added by the run")
    ts = np.array(sorted({r["T"] for r in hyper}), dtype=float)
    bound = n_params * ts * float(information_bound(common.BETA)) / 8 / MB
    ax2.plot(ts, bound, "k--", label="information bound N T log2(1/β) / 8")
    py_int = [res["python_int_bytes"][str(int(t))] * n_params / MB for t in ts]
    ax2.plot(ts, py_int, "s:", color="tab:green", label="Python-int buffer (2015), its ints")
    ax2.set(xscale="log", yscale="log", xlabel="T (iterations)", ylabel="MB",
            title=f"memory that grows with T, N = {n_params:,}")
    ax2.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "memory_vs_T.png", dpi=110)
    plt.close(fig)


def ratios(cfg):
    x0, g = common.vector_problem(10**6)
    ours, plain = make_optimiser("ours", x0), make_optimiser("numpy", x0)
    for _ in range(20):
        ours.step(g, common.ALPHA, common.BETA)
        plain.step(g, common.ALPHA, common.BETA)
    ours.unstep(g, common.ALPHA, common.BETA)
    numpy_s = common.best_of(lambda: plain.step(g, common.ALPHA, common.BETA), 15)
    r = {"n_numpy": 10**6,
         "step_vs_numpy": common.best_of(lambda: ours.step(g, common.ALPHA, common.BETA), 15)
         / numpy_s}
    r["reverse_vs_numpy"] = common.best_of(
        lambda: ours.unstep(g, common.ALPHA, common.BETA), 15) / numpy_s
    return r


def seed_ratios(rounds, settle, n_iter=100):
    """Seed network, T = ``n_iter``: ours / naive for momentum (``sgd``) and Adam (``adam``),
    each side's smallest of ``rounds`` runs taken in turn, ``settle`` seconds before each."""
    from .bench_adam import adam_problem, adam_value_and_hypergrads

    problems = {"momentum": (common.seed_problem(n_iter), common.value_and_hypergrads),
                "adam": (adam_problem(n_iter), adam_value_and_hypergrads)}
    for impl in ("ours", "naive"):  # imports, JIT, data
        common.value_and_hypergrads(common.seed_problem(2), impl)
        adam_value_and_hypergrads(adam_problem(2), impl)
    out = {}
    for name, (problem, run) in problems.items():
        best = common.alternating_best({impl: functools.partial(run, problem, impl)
                                        for impl in ("naive", "ours")}, rounds, settle=settle)
        out[name] = {**best, "ratio": best["ours"] / best["naive"]}
    return out


def main_job_pairs(pairs, extra=()):
    """The main job end to end, ``hypergrad-fast schedules --no-progress`` with the compiled
    objective then with ``--backend autograd``, each in a child process, ``pairs`` times in
    turn: a list of (compiled seconds, autograd seconds) of wall time (start-up, the
    meta-optimisation, learning curves, plots and files).  ``extra``: more flags for both
    (tests use tiny settings)."""
    import tempfile

    cmd = [sys.executable, "-m", "hypergrad_fast", "schedules", "--no-progress", *extra]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            seconds = []
            for backend in ("compiled", "autograd"):
                start = time.perf_counter()
                subprocess.run([*cmd, "--backend", backend, "--out", f"{tmp}/{backend}{i}"],
                               check=True, stdout=subprocess.DEVNULL)
                seconds.append(time.perf_counter() - start)
            out.append(tuple(seconds))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark report without asv.")
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--out", default="out/report", help="output folder (default out/report)")
    parser.add_argument("--seed-ratios", type=int, metavar="ROUNDS",
                        help="only print the seed network's T = 100 ratios, ours / naive, "
                             "momentum and Adam, ROUNDS runs each (no report)")
    parser.add_argument("--settle", type=float, default=common.SETTLE_SECONDS,
                        help="with --seed-ratios: seconds of sleep before each timed run "
                             f"(default {common.SETTLE_SECONDS})")
    parser.add_argument("--main-job", type=int, metavar="PAIRS",
                        help="only time the main job end to end, compiled then --backend "
                             "autograd, PAIRS pairs in turn, and print their ratios (no "
                             "report; about 50 s a pair)")
    args = parser.parse_args(argv)
    if args.main_job:
        ratios_ = []
        for ours, ref in main_job_pairs(args.main_job):
            ratios_.append(ours / ref)
            print(f"main job: compiled {ours:.2f} s, autograd {ref:.2f} s, "
                  f"ratio {ratios_[-1]:.3f}", flush=True)
        print(f"median ratio {float(np.median(ratios_)):.3f} over {len(ratios_)} pairs")
        return
    if args.seed_ratios:
        for name, r in seed_ratios(args.seed_ratios, args.settle).items():
            print(f"{name}: ours {r['ours']:.3f} s, naive {r['naive']:.3f} s, "
                  f"ratio {r['ratio']:.3f} (settle {args.settle} s, {args.seed_ratios} rounds)")
        return
    cfg = QUICK if args.quick else FULL
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    import platform

    res = {"mode": "quick" if args.quick else "full", "config": cfg,
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.processor() or platform.machine()}, Python "
                      f"{platform.python_version()}"}
    log("one step")
    res["steps"] = step_times(cfg["step_sizes"], cfg["python_int_max_n"])
    log("one step after T prior steps")
    res["prior"] = step_time_vs_prior(cfg["prior_steps"])
    log("information buffer")
    res["bits"] = buffer_bits(cfg["bits_T"])
    log("hypergradients (one child process each)")
    res["hypergrad"] = hypergrad_runs(cfg["hyper_T"], cfg["naive_max_T"])
    res["python_int_bytes"] = {str(t): b for t, b in
                               python_int_buffer_bytes(cfg["hyper_T"]).items()}
    log("ratios")
    res["ratios"] = ratios(cfg)
    prior = {(r["T"], r["impl"]): r["step_s"] for r in res["prior"]}
    res["ratios"]["python_int_vs_ours_T200"] = prior[200, "python_int"] / prior[200, "ours"]
    res["ratios"]["ours_T2000_vs_T200"] = prior[2000, "ours"] / prior[200, "ours"]
    res["ratios"]["python_int_T2000_vs_T200"] = prior[2000, "python_int"] / prior[200, "python_int"]
    res["ratios"]["hyper_T"] = cfg["hyper_ratio_T"]
    if args.quick:  # the child runs at this T instead of 2 x 2 more runs
        hyper = {(r["T"], r["impl"]): r["seconds"] for r in res["hypergrad"]}
        t = cfg["hyper_ratio_T"]
        res["ratios"]["hyper_ours_vs_naive"] = hyper[t, "ours"] / hyper[t, "naive"]
    else:
        res["ratios"]["hyper_ours_vs_naive"] = hypergrad_ratio_in_child(cfg["hyper_ratio_T"])

    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out_dir / "report.md").write_text(text + "\n")
    plots(res, out_dir)
    print(text)
    log(f"wrote {out_dir}/report.md, results.json, time_vs_T.png, memory_vs_T.png "
        f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
