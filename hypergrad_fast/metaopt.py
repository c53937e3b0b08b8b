"""The meta-optimiser: Adam on hypergradients, with atomic, resumable checkpoints.

``optimize(hyperloss_and_grad, h0, n_iters)`` runs ``n_iters`` Adam steps on a flat
float64 hyperparameter vector (pack named hyperparameter arrays into it with
:class:`~hypergrad_fast.models.ParamLayout`).  After every meta-iteration it writes
a checkpoint (.npz, no pickle) by writing a temporary file in the same folder and
renaming it over the old one, so a crash leaves either the old or the new
checkpoint, never half of one.  Everything is deterministic, so a run resumed from
its checkpoint ends with bit-identical hyperparameters to an uninterrupted run.

Meta-iteration ``i`` evaluates the hyperloss and its gradient at ``h_i`` (that
evaluation is record ``i``) and then steps to ``h_{i+1}``; after the last step the
final ``h_{n_iters}`` is evaluated too, so there are ``n_iters + 1`` records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np

__all__ = [
    "AdamState",
    "CheckpointError",
    "MetaResult",
    "FORMAT_VERSION",
    "BASE_RECORD_KEYS",
    "adam_init",
    "adam_update",
    "atomic_write",
    "load_checkpoint",
    "optimize",
]

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout; bump when the stored arrays change meaning.
FORMAT_VERSION = 1
_FORMAT_NAME = "hypergrad_fast.meta checkpoint"

#: Record fields that ``optimize`` fills in itself (record_fn adds more).
BASE_RECORD_KEYS = ("hyperloss", "grad_norm", "iter_time", "wall_time")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to this run."""


class AdamState(NamedTuple):
    """Adam's whole state.

    params:    float64 (P,) — the hyperparameters h.
    m, v:      float64 (P,) — running means of the gradient and of its square.
    iteration: int — the number of Adam steps taken so far.
    """

    params: np.ndarray
    m: np.ndarray
    v: np.ndarray
    iteration: int


class MetaResult(NamedTuple):
    """What :func:`optimize` returns.

    params:  float64 (P,) — the final hyperparameters h_{n_iters}.
    state:   AdamState after ``n_iters`` steps.
    records: dict key -> float64 (n_iters + 1,); entry i was evaluated at h_i.
    resumed_from: the number of meta-iterations read from a checkpoint (0 when fresh).
    """

    params: np.ndarray
    state: AdamState
    records: dict
    resumed_from: int


def adam_init(params) -> AdamState:
    """Adam state at iteration 0 for the flat float64 hyperparameters ``params``."""
    params = np.array(params, dtype=np.float64)
    if params.ndim != 1:
        raise ValueError(f"hyperparameters must be a flat 1-D vector, got shape {params.shape}")
    return AdamState(params, np.zeros_like(params), np.zeros_like(params), 0)


def adam_update(state: AdamState, grad, step_size, b1=0.9, b2=0.999, eps=1e-8) -> AdamState:
    """One Adam step (Kingma & Ba, bias-corrected) downhill along ``grad``; a new state.

    ``step_size`` is in units of the hyperparameters (each coordinate moves by
    about ``step_size`` per step while the gradient's sign is steady).
    """
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != state.params.shape:
        raise ValueError(f"gradient has shape {grad.shape}, hyperparameters "
                         f"{state.params.shape}")
    i = state.iteration + 1
    m = b1 * state.m + (1.0 - b1) * grad
    v = b2 * state.v + (1.0 - b2) * grad**2
    m_hat = m / (1.0 - b1**i)
    v_hat = v / (1.0 - b2**i)
    params = state.params - step_size * m_hat / (np.sqrt(v_hat) + eps)
    return AdamState(params, m, v, i)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def atomic_write(path, write: Callable) -> None:
    """Write ``path`` all at once: ``write(fileobj)`` fills a temporary file in the
    same folder, which is flushed to disk and then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _run_config(config, h0, step_size, b1, b2, eps) -> dict:
    """The JSON-able description a checkpoint must match to be resumed."""
    try:
        # Round trip so tuples and lists, ints and equal floats compare as stored.
        user = json.loads(json.dumps(config if config is not None else {}, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must be JSON-serialisable: {err}") from None
    return {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n_hyperparameters": int(h0.shape[0]),
        "optimizer": {"name": "adam", "step_size": float(step_size), "b1": float(b1),
                      "b2": float(b2), "eps": float(eps)},
        "config": user,
    }


def _save_checkpoint(path, run_config, h0, state: AdamState, keys, rows) -> None:
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "run_config": np.array(json.dumps(run_config, sort_keys=True)),
        "h0": h0,
        "params": state.params,
        "m": state.m,
        "v": state.v,
        "iteration": np.array(state.iteration, dtype=np.int64),
        "record_keys": np.array(list(keys), dtype=str),
        "records": np.array(rows, dtype=np.float64).reshape(len(rows), len(keys)),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    """Read and sanity-check a checkpoint written by :func:`optimize`.

    Returns a dict with ``run_config`` (dict), ``h0``, ``state`` (AdamState),
    ``record_keys`` (tuple of str) and ``records`` (float64 (n, len(keys))).
    Raises :class:`CheckpointError` naming the file if it is unreadable,
    truncated or inconsistent.
    """
    path = Path(path)

    def bad(why):
        return CheckpointError(f"checkpoint {path} is unusable: {why}")

    try:
        # Read every member now: NpzFile is lazy, and a damaged member (bad CRC,
        # short data) only shows itself when read.
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise bad(f"cannot read it as an .npz archive ({type(err).__name__}: {err}); "
                  "it may be truncated or corrupt — delete it to start over") from None
    required = ("format_version", "run_config", "h0", "params", "m", "v", "iteration",
                "record_keys", "records")
    missing = [k for k in required if k not in data]
    if missing:
        raise bad(f"missing arrays {missing}")
    try:
        version = int(data["format_version"])
    except (TypeError, ValueError):
        raise bad(f"format_version is {data['format_version']!r}, not an integer") from None
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}, this code reads version {FORMAT_VERSION}")
    try:
        run_config = json.loads(str(data["run_config"]))
    except ValueError as err:
        raise bad(f"its run configuration is not valid JSON ({err})") from None
    h0, params, m, v = (np.asarray(data[k], dtype=np.float64) for k in ("h0", "params", "m",
                                                                        "v"))
    if h0.ndim != 1 or not (h0.shape == params.shape == m.shape == v.shape):
        raise bad(f"inconsistent shapes h0 {h0.shape}, params {params.shape}, "
                  f"m {m.shape}, v {v.shape}")
    for name, arr in (("params", params), ("m", m), ("v", v)):
        if not np.isfinite(arr).all():
            raise bad(f"{name} holds non-finite values")
    try:
        iteration = int(data["iteration"])
    except (TypeError, ValueError):
        raise bad(f"iteration is {data['iteration']!r}, not an integer") from None
    keys = tuple(str(k) for k in data["record_keys"].tolist())
    records = np.asarray(data["records"], dtype=np.float64)
    if records.ndim != 2 or records.shape[1] != len(keys):
        raise bad(f"records have shape {records.shape} for {len(keys)} keys")
    if iteration < 0 or records.shape[0] not in (iteration, iteration + 1):
        raise bad(f"{records.shape[0]} records do not fit iteration {iteration}")
    return {"run_config": run_config, "h0": h0,
            "state": AdamState(params, m, v, iteration),
            "record_keys": keys, "records": records}


def _config_differences(old, new, prefix=""):
    """Human-readable lines naming every place two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{name}: not in the checkpoint, now {new[key]!r}")
            elif key not in new:
                lines.append(f"{name}: checkpoint has {old[key]!r}, now absent")
            else:
                lines += _config_differences(old[key], new[key], name)
        return lines
    if old != new:
        return [f"{prefix or 'config'}: checkpoint has {old!r}, now {new!r}"]
    return []


def _check_matches(path, ckpt, run_config, h0, n_iters):
    """Raise CheckpointError naming each way the checkpoint differs from this run."""
    diffs = _config_differences(ckpt["run_config"], run_config)
    if ckpt["h0"].shape != h0.shape:
        diffs.append(f"hyperparameter shape: checkpoint has {ckpt['h0'].shape}, "
                     f"now {h0.shape}")
    elif not np.array_equal(ckpt["h0"], h0):
        i = int(np.flatnonzero(ckpt["h0"] != h0)[0])
        diffs.append(f"initial hyperparameters: h0[{i}] is {ckpt['h0'][i]!r} in the "
                     f"checkpoint, now {h0[i]!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run; refusing to resume from it:\n  "
            + "\n  ".join(diffs)
            + "\nUse the original settings, or start fresh without resume.")
    done = ckpt["state"].iteration
    if done > n_iters:
        raise CheckpointError(f"checkpoint {path} already holds {done} meta-iterations, "
                              f"more than the {n_iters} asked for")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _evaluate(hyperloss_and_grad, record_fn, h, meta_iter):
    """One hyperloss + hypergradient evaluation and its record (without times)."""
    value, grad = hyperloss_and_grad(h)
    value = float(value)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != h.shape:
        raise ValueError(f"hyperloss_and_grad returned a gradient of shape {grad.shape} "
                         f"for hyperparameters of shape {h.shape}")
    if not math.isfinite(value) or not np.isfinite(grad).all():
        raise FloatingPointError(
            f"meta-iteration {meta_iter}: the hyperloss is {value} and the hypergradient "
            f"has {int((~np.isfinite(grad)).sum())} non-finite entries; try a smaller "
            "step size")
    record = {"hyperloss": value, "grad_norm": float(np.linalg.norm(grad))}
    if record_fn is not None:
        extra = record_fn(h, value, grad)
        clash = set(extra) & set(BASE_RECORD_KEYS)
        if clash:
            raise ValueError(f"record_fn must not return the reserved keys {sorted(clash)}")
        record.update({str(k): float(x) for k, x in extra.items()})
    return value, grad, record


def optimize(hyperloss_and_grad: Callable, h0, n_iters: int, step_size: float = 0.04, *,
             b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
             config: Optional[Mapping] = None, checkpoint=None, resume: bool = False,
             record_fn: Optional[Callable] = None, progress: bool = True,
             loss_name: str = "hyperloss", desc: str = "meta-iterations") -> MetaResult:
    """Minimise a hyperloss with Adam, checkpointing after every meta-iteration.

    Parameters
    ----------
    hyperloss_and_grad : ``h -> (value, grad)`` for flat float64 ``h`` (P,); must be
        deterministic for resumed runs to match uninterrupted ones bit for bit.
    h0 : (P,) — initial hyperparameters.
    n_iters : number of Adam steps (meta-iterations); n_iters + 1 evaluations.
    step_size, b1, b2, eps : Adam's settings (step_size in hyperparameter units).
    config : JSON-able description of the run (data, model, seeds...); stored in the
        checkpoint, and a resumed run must match it (the number of meta-iterations
        is not part of it, so a finished run can be continued further).
    checkpoint : path of the .npz checkpoint, or None for none.
    resume : continue from ``checkpoint``.  If the file does not exist the run starts
        fresh and says so in the log (warning); a file that cannot be read or that
        belongs to another run (config, optimizer settings, h0 or its shape differ)
        raises :class:`CheckpointError` — never a silent restart.
    record_fn : ``(h, value, grad) -> {name: float}``, extra fields for each record
        (called right after the evaluation at h, with the same keys every time).
    progress : show a tqdm bar with the latest hyperloss, labelled ``loss_name``.

    Records (each float64 (n_iters + 1,)): ``hyperloss``, ``grad_norm`` (Euclidean
    norm of the hypergradient), ``iter_time`` (seconds this evaluation and step
    took), ``wall_time`` (seconds of work since the run began, summed across
    resumes) and the record_fn fields.
    """
    n_iters = int(n_iters)
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number, got {step_size}")
    state = adam_init(h0)
    h0 = state.params.copy()
    run_config = _run_config(config, h0, step_size, b1, b2, eps)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")

    keys, rows = None, []
    resumed_from = 0
    if resume:
        path = Path(checkpoint)
        if path.exists():
            ckpt = load_checkpoint(path)
            _check_matches(path, ckpt, run_config, h0, n_iters)
            state = ckpt["state"]
            resumed_from = state.iteration
            keys = ckpt["record_keys"]
            # A finished run also holds the evaluation at its final h; keep it only
            # if nothing more is asked, otherwise the next meta-iteration redoes it.
            n_keep = state.iteration + 1 if state.iteration == n_iters else state.iteration
            rows = [list(r) for r in ckpt["records"][:n_keep]]
            logger.info("resuming from %s at meta-iteration %d of %d", path,
                        state.iteration, n_iters)
        else:
            logger.warning("no checkpoint at %s to resume from; starting fresh", path)
    elif checkpoint is not None and Path(checkpoint).exists():
        logger.info("overwriting the existing checkpoint %s (resume not requested)",
                    checkpoint)

    def add_record(record):
        nonlocal keys
        if keys is None:
            keys = tuple(record)
        elif set(record) != set(keys):
            raise CheckpointError(
                f"record fields {sorted(record)} differ from the checkpoint's "
                f"{sorted(keys)}" + (f" ({checkpoint})" if checkpoint is not None else ""))
        rows.append([record[k] for k in keys])

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_iters, initial=state.iteration, desc=desc, unit="it")
    try:
        wall = rows[-1][keys.index("wall_time")] if rows else 0.0
        while len(rows) <= n_iters:
            i = len(rows)
            start = time.perf_counter()
            value, grad, record = _evaluate(hyperloss_and_grad, record_fn, state.params, i)
            if i < n_iters:
                state = adam_update(state, grad, step_size, b1, b2, eps)
            elapsed = time.perf_counter() - start
            wall += elapsed
            record["iter_time"] = elapsed
            record["wall_time"] = wall
            add_record(record)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, run_config, h0, state, keys, rows)
            if bar is not None:
                bar.set_postfix({loss_name: f"{value:.4f}"}, refresh=False)
                if i < n_iters:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    records = {k: np.array([r[j] for r in rows], dtype=np.float64) for j, k in enumerate(keys)}
    return MetaResult(state.params.copy(), state, records, resumed_from)
