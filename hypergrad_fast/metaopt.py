"""The meta-optimiser: Adam on hypergradients, with atomic, resumable checkpoints.

``optimize(hyperloss_and_grad, h0, n_iters)`` runs ``n_iters`` Adam steps on a flat
float64 hyperparameter vector (pack named hyperparameter arrays into it with
:class:`~hypergrad_fast.models.ParamLayout`).

Meta-iteration ``i`` evaluates the hyperloss and its gradient at ``h_i`` (that
evaluation is record ``i``) and then steps to ``h_{i+1}``; after the last step the
final ``h_{n_iters}`` is evaluated too, so there are ``n_iters + 1`` records.

After every evaluation a checkpoint (.npz, no pickle) keeps the hyperparameters just
evaluated, the Adam state that reached them, their hypergradient and every record so
far.  It is written to a temporary file in the same folder and renamed over the old
one, so a crash leaves either the old or the new checkpoint, never half of one (and
the next start removes a dead writer's temporary file).  Everything is deterministic,
so a run resumed from its checkpoint ends with bit-identical hyperparameters to an
uninterrupted run.

If the training run at ``h_{i+1}`` is not finite, the checkpoint still holds ``h_i``
with its gradient and Adam state, marked as diverged; resuming it with a smaller step
size redoes the step from ``h_i``.  That is the only way a resumed run may change
the step size.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import secrets
import stat
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .data import _DEFLATE_MAX_RATIO, _read_npy_member

__all__ = [
    "AdamState",
    "CheckpointError",
    "DivergenceError",
    "MetaResult",
    "FORMAT_VERSION",
    "BASE_RECORD_KEYS",
    "adam_init",
    "adam_update",
    "atomic_write",
    "load_checkpoint",
    "optimize",
    "remove_stale_temps",
]

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout; bump when the stored arrays change meaning.
#: Version 2 keeps the evaluated state and its gradient (version 1 kept the state
#: after the next step, which left nothing finite to continue from after divergence).
FORMAT_VERSION = 2
_FORMAT_NAME = "hypergrad_fast.meta checkpoint"

#: Record fields that ``optimize`` fills in itself (record_fn adds more).
BASE_RECORD_KEYS = ("hyperloss", "grad_norm", "iter_time", "wall_time")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to this run."""


class DivergenceError(FloatingPointError):
    """The training run at one meta-iteration's hyperparameters was not finite.

    meta_iteration: the meta-iteration whose evaluation failed.
    step_size: the Adam step size of the run (the step into meta_iteration used it).
    checkpoint: the checkpoint that keeps meta-iteration ``meta_iteration - 1``, the
        last finite one, with Adam's state, ready to resume with a smaller step size;
        None when there is none (no checkpoint, or meta-iteration 0 diverged).
    reason: what the evaluation reported.
    """

    def __init__(self, meta_iteration: int, step_size: float, checkpoint, reason: str):
        self.meta_iteration = meta_iteration
        self.step_size = step_size
        self.checkpoint = checkpoint
        self.reason = reason
        if meta_iteration == 0:
            advice = ("the initial hyperparameters already give a non-finite training run, "
                      "so no step size can help")
        elif checkpoint is None:
            advice = f"try a smaller step size than {step_size!r}"
        else:
            advice = (f"checkpoint {checkpoint} keeps meta-iteration {meta_iteration - 1}, "
                      "the last whose training run was finite, with Adam's state; resume "
                      f"from it with a smaller step size (e.g. {step_size / 2!r})")
        super().__init__(f"meta-iteration {meta_iteration}: {reason}; {advice}")


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
    resumed_from: the meta-iteration whose evaluation the checkpoint held (its work is
        reused, the run continues with its step), or 0 when the run started fresh.
    step_sizes: float64 (n_iters,) — the step size of each Adam step; they differ only
        where a diverged run was resumed with a smaller one.
    """

    params: np.ndarray
    state: AdamState
    records: dict
    resumed_from: int
    step_sizes: np.ndarray


def _check_settings(n_iters, step_size, b1, b2, eps):
    """``(n_iters, step_size, b1, b2, eps)`` as int and floats; ValueError naming the
    first that is not a non-negative integer, a positive finite number, in [0, 1),
    in [0, 1) and a positive finite number respectively."""
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative integer, got {n_iters!r}")
    values = {}
    for name, x in (("step_size", step_size), ("b1", b1), ("b2", b2), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
        values[name] = float(x)
    for name in ("step_size", "eps"):
        if not values[name] > 0.0:
            raise ValueError(f"{name} must be positive, got {values[name]!r}")
    for name in ("b1", "b2"):
        # b = 1 divides by 1 - b**i = 0 in the bias correction.
        if not 0.0 <= values[name] < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {values[name]!r}")
    return int(n_iters), values["step_size"], values["b1"], values["b2"], values["eps"]


def adam_init(params) -> AdamState:
    """Adam state at iteration 0 for the flat float64 hyperparameters ``params``."""
    params = np.array(params, dtype=np.float64)
    if params.ndim != 1:
        raise ValueError(f"hyperparameters must be a flat 1-D vector, got shape {params.shape}")
    return AdamState(params, np.zeros_like(params), np.zeros_like(params), 0)


def adam_update(state: AdamState, grad, step_size, b1=0.9, b2=0.999, eps=1e-8) -> AdamState:
    """One Adam step (Kingma & Ba, bias-corrected) downhill along ``grad``; a new state.

    ``step_size`` is in units of the hyperparameters (each coordinate moves by
    about ``step_size`` per step while the gradient's sign is steady); b1 and b2 lie
    in [0, 1) and eps > 0 (:func:`optimize` checks them).
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


def _temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.PID.HEX16.tmp``."""
    # The pid lets remove_stale_temps tell a dead writer's file from a live one's.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _temp_pattern(path: Path) -> re.Pattern:
    """Every name :func:`_temp_path` can give for ``path``; group 1 is the pid."""
    return re.compile(rf"\.{re.escape(path.name)}\.([0-9]+)\.[0-9a-f]{{16}}\.tmp")


def atomic_write(path, write: Callable) -> None:
    """Write ``path`` all at once: ``write(fileobj)`` fills a temporary file in the
    same folder (``.NAME.PID.HEX16.tmp``), which is flushed to disk and then renamed
    over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    # O_EXCL never writes into someone else's file; mode 0o666 leaves the permissions
    # to the umask, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
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


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (POSIX only)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (OverflowError, ValueError):
        return True  # no pid this code wrote: not ours to judge
    return True


def remove_stale_temps(path) -> list:
    """Delete the temporary files that :func:`atomic_write` left next to ``path`` when
    its process died mid-write (SIGKILL, power loss); returns the removed paths.

    Only files in ``path``'s folder named exactly as atomic_write names them for
    ``path``, whose writing process no longer exists on this machine, are removed.
    Does nothing where processes cannot be asked after (not POSIX).
    """
    path = Path(path)
    if os.name != "posix":
        return []  # os.kill(pid, 0) would not be a harmless question there
    pattern = _temp_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []  # no folder yet (nothing to clean), or not ours to read
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if (match is None or not entry.is_file(follow_symlinks=False)
                or _process_exists(int(match[1]))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue  # gone already, or not ours to delete: leave it
        logger.info("removed %s, left by a writer that died", entry.path)
        removed.append(Path(entry.path))
    return removed


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


def _save_checkpoint(path, run_config, h0, state: AdamState, grad, step_sizes, keys, rows,
                     diverged_at: int = 0) -> None:
    """Write the checkpoint of the evaluation at ``state.params`` (record
    ``state.iteration``, with hypergradient ``grad``); ``diverged_at`` > 0 marks that
    the step after it led to a non-finite training run."""
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "run_config": np.array(json.dumps(run_config, sort_keys=True)),
        "h0": h0,
        "params": state.params,
        "m": state.m,
        "v": state.v,
        "grad": grad,
        "iteration": np.array(state.iteration, dtype=np.int64),
        "step_sizes": np.array(step_sizes, dtype=np.float64).reshape(len(step_sizes)),
        "diverged_at": np.array(diverged_at, dtype=np.int64),
        "record_keys": np.array(list(keys), dtype=str),
        "records": np.array(rows, dtype=np.float64).reshape(len(rows), len(keys)),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


#: Member name -> (ndim, dtype kind) its .npy header must declare; kind "i" is int64,
#: "f" float64, "U" a unicode string of any length.
_MEMBERS = {
    "format_version": (0, "i"), "run_config": (0, "U"), "h0": (1, "f"), "params": (1, "f"),
    "m": (1, "f"), "v": (1, "f"), "grad": (1, "f"), "iteration": (0, "i"),
    "step_sizes": (1, "f"), "diverged_at": (0, "i"), "record_keys": (1, "U"),
    "records": (2, "f"),
}
_EXACT_DTYPES = {"i": np.dtype(np.int64), "f": np.dtype(np.float64)}


def _npy_header(zf: zipfile.ZipFile, member: str):
    """(shape, fortran_order, dtype) from the .npy header of ``member``; reads no data."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{member}: .npy version {version}")


def _read_members(path: Path, bad) -> dict:
    """Every array of ``_MEMBERS`` from the checkpoint at ``path``, each one's header
    checked before its data are read; ``bad(why)`` makes the CheckpointError raised."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("it is not a regular file")
        with zipfile.ZipFile(f) as zf:
            present = set(zf.namelist())

            def read(name):
                member = f"{name}.npy"
                shape, _, dtype = _npy_header(zf, member)
                ndim, kind = _MEMBERS[name]
                if len(shape) != ndim or dtype.kind != kind or dtype != _EXACT_DTYPES.get(
                        kind, dtype):
                    raise bad(f"{member} holds a {dtype} array of shape {shape}, not the "
                              f"{ndim}-D {_EXACT_DTYPES.get(kind, 'unicode')} array expected")
                # A stored member's data lie in the file; deflate expands at most
                # _DEFLATE_MAX_RATIO-fold.  Refuse larger claims before allocating.
                deflated = zf.getinfo(member).compress_type == zipfile.ZIP_DEFLATED
                limit = st.st_size * (_DEFLATE_MAX_RATIO if deflated else 1)
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > limit:
                    raise bad(f"{member} claims a {dtype} array of shape {shape} ({nbytes} "
                              f"bytes), more than the {st.st_size}-byte file can hold")
                return _read_npy_member(zf, member, shape, dtype)

            missing = [name for name in _MEMBERS if f"{name}.npy" not in present]
            # The version first: an older layout lacks arrays, and saying so helps less.
            if "format_version" not in missing:
                version = int(read("format_version"))
                if version != FORMAT_VERSION:
                    raise bad(f"format version {version}, this code reads version "
                              f"{FORMAT_VERSION}")
            if missing:
                raise bad(f"missing arrays {missing}")
            return {name: read(name) for name in _MEMBERS}


def _positive_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)


def load_checkpoint(path) -> dict:
    """Read and sanity-check a checkpoint written by :func:`optimize`.

    Returns a dict with ``run_config`` (dict), ``h0``, ``state`` (AdamState at the last
    evaluation), ``grad`` (its hypergradient), ``step_sizes`` (float64 (iteration,)),
    ``diverged_at`` (0, or the meta-iteration whose training run was not finite),
    ``record_keys`` (tuple of str) and ``records`` (float64 (iteration + 1, len(keys))).
    Each array's .npy header is checked before its data are read.  Raises
    :class:`CheckpointError` naming the file if it is not a regular file, or is
    unreadable, truncated or inconsistent; FileNotFoundError if it does not exist.
    """
    path = Path(path)

    def bad(why):
        return CheckpointError(f"checkpoint {path} is unusable: {why}")

    try:
        data = _read_members(path, bad)
    except (CheckpointError, FileNotFoundError):
        raise
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zlib.error) as err:
        # RuntimeError and NotImplementedError: zipfile's encrypted members and
        # unknown compression methods.
        raise bad(f"cannot read it as an .npz archive ({type(err).__name__}: {err}); "
                  "it may be truncated or corrupt — delete it to start over") from None
    try:
        run_config = json.loads(str(data["run_config"]))
    except ValueError as err:
        raise bad(f"its run configuration is not valid JSON ({err})") from None
    optimizer = run_config.get("optimizer") if isinstance(run_config, dict) else None
    if not (isinstance(optimizer, dict) and _positive_number(optimizer.get("step_size"))):
        raise bad("its run configuration names no positive optimizer step size")
    h0, params, m, v, grad = (data[k] for k in ("h0", "params", "m", "v", "grad"))
    if not h0.shape == params.shape == m.shape == v.shape == grad.shape:
        raise bad(f"inconsistent shapes h0 {h0.shape}, params {params.shape}, "
                  f"m {m.shape}, v {v.shape}, grad {grad.shape}")
    for name in ("h0", "params", "m", "v", "grad"):
        if not np.isfinite(data[name]).all():
            raise bad(f"{name} holds non-finite values")
    if (v < 0).any():
        raise bad("v, a mean of squares, holds negative values")
    iteration = int(data["iteration"])
    if iteration < 0:
        raise bad(f"iteration is {iteration}")
    step_sizes = data["step_sizes"]
    if step_sizes.shape != (iteration,) or not (step_sizes > 0).all() or not np.isfinite(
            step_sizes).all():
        raise bad(f"step sizes {step_sizes.tolist()} do not fit iteration {iteration}")
    keys = tuple(data["record_keys"].tolist())
    if len(set(keys)) != len(keys):
        raise bad(f"record fields {list(keys)} repeat")
    lacking = [k for k in BASE_RECORD_KEYS if k not in keys]
    if lacking:
        raise bad(f"its records lack the fields {lacking}")
    records = data["records"]
    if records.shape != (iteration + 1, len(keys)):
        raise bad(f"records have shape {records.shape}, expected {(iteration + 1, len(keys))} "
                  f"for iteration {iteration} and {len(keys)} fields")
    for key in BASE_RECORD_KEYS:
        if not np.isfinite(records[:, keys.index(key)]).all():
            raise bad(f"record field {key} holds non-finite values")
    diverged_at = int(data["diverged_at"])
    if diverged_at not in (0, iteration + 1):
        raise bad(f"diverged_at is {diverged_at}, neither 0 nor {iteration + 1}")
    return {"run_config": run_config, "h0": h0, "state": AdamState(params, m, v, iteration),
            "grad": grad, "step_sizes": step_sizes, "diverged_at": diverged_at,
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


def _check_matches(path, ckpt, run_config, h0, n_iters, record_keys):
    """Raise CheckpointError naming each way the checkpoint differs from this run.

    A diverged checkpoint must be resumed with a smaller step size (anything else
    would take the same step again); otherwise the step size must match too.
    ``record_keys`` (a set, or None for unknown) are the record fields of this run.
    """
    old = ckpt["run_config"]
    diverged_at = ckpt["diverged_at"]
    old_step = old["optimizer"]["step_size"]
    new_step = run_config["optimizer"]["step_size"]
    if diverged_at:
        old = {**old, "optimizer": {**old["optimizer"], "step_size": new_step}}
    diffs = _config_differences(old, run_config)
    if ckpt["h0"].shape != h0.shape:
        diffs.append(f"hyperparameter shape: checkpoint has {ckpt['h0'].shape}, "
                     f"now {h0.shape}")
    elif not np.array_equal(ckpt["h0"], h0):
        i = int(np.flatnonzero(ckpt["h0"] != h0)[0])
        diffs.append(f"initial hyperparameters: h0[{i}] is {ckpt['h0'][i]!r} in the "
                     f"checkpoint, now {h0[i]!r}")
    if record_keys is not None and set(ckpt["record_keys"]) != record_keys:
        have = set(ckpt["record_keys"])
        diffs.append(f"record fields: the checkpoint lacks {sorted(record_keys - have)} "
                     f"and has {sorted(have - record_keys)} besides this run's")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run; refusing to resume from it:\n  "
            + "\n  ".join(diffs)
            + "\nUse the original settings, or start fresh without resume.")
    if diverged_at and not new_step < old_step:
        raise CheckpointError(
            f"checkpoint {path} stopped because training diverged at meta-iteration "
            f"{diverged_at} with step size {old_step!r}; resuming with step size "
            f"{new_step!r} would take that step again. Resume with a smaller step size, "
            f"e.g. {old_step / 2!r}: the run continues from meta-iteration "
            f"{diverged_at - 1} with Adam's state kept.")
    done = ckpt["state"].iteration
    if done > n_iters:
        raise CheckpointError(f"checkpoint {path} already holds {done} meta-iterations, "
                              f"more than the {n_iters} asked for")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _evaluate(hyperloss_and_grad, record_fn, h):
    """One hyperloss + hypergradient evaluation and its record (without times).

    Raises FloatingPointError if the value or the gradient is not finite.
    """
    value, grad = hyperloss_and_grad(h)
    value = float(value)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != h.shape:
        raise ValueError(f"hyperloss_and_grad returned a gradient of shape {grad.shape} "
                         f"for hyperparameters of shape {h.shape}")
    if not math.isfinite(value) or not np.isfinite(grad).all():
        raise FloatingPointError(
            f"the hyperloss is {value} and the hypergradient has "
            f"{int((~np.isfinite(grad)).sum())} non-finite entries")
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
             record_fn: Optional[Callable] = None,
             record_keys: Optional[Sequence[str]] = None, progress: bool = True,
             loss_name: str = "hyperloss", desc: str = "meta-iterations") -> MetaResult:
    """Minimise a hyperloss with Adam, checkpointing after every evaluation.

    Parameters
    ----------
    hyperloss_and_grad : ``h -> (value, grad)`` for flat float64 ``h`` (P,); must be
        deterministic for resumed runs to match uninterrupted ones bit for bit.  A
        non-finite value or gradient, or a FloatingPointError or OverflowError it
        raises, means the training run at ``h`` diverged.
    h0 : (P,) — initial hyperparameters.
    n_iters : number of Adam steps (meta-iterations), a non-negative integer;
        n_iters + 1 evaluations.
    step_size, b1, b2, eps : Adam's settings: step_size > 0 (in hyperparameter units),
        b1 and b2 in [0, 1), eps > 0, all finite.
    config : JSON-able description of the run (data, model, seeds...); stored in the
        checkpoint, and a resumed run must match it (the number of meta-iterations
        is not part of it, so a finished run can be continued further).
    checkpoint : path of the .npz checkpoint, or None for none.  Stale temporary
        files of it (:func:`remove_stale_temps`) are removed first; anything at the
        path that is not a regular file raises :class:`CheckpointError`.
    resume : continue from ``checkpoint``.  If the file does not exist the run starts
        fresh and says so in the log (warning); a file that cannot be read or that
        belongs to another run (config, optimizer settings, h0 or its shape, record
        fields differ) raises :class:`CheckpointError` — never a silent restart.  A
        checkpoint of a diverged run continues only with a smaller step size.
    record_fn : ``(h, value, grad) -> {name: float}``, extra fields for each record
        (called right after the evaluation at h, with the same keys every time).
    record_keys : the names record_fn returns, if known: a checkpoint with other
        record fields is then refused before any work.
    progress : show a tqdm bar with the latest hyperloss, labelled ``loss_name``.

    Records (each float64 (n_iters + 1,)): ``hyperloss``, ``grad_norm`` (Euclidean
    norm of the hypergradient), ``iter_time`` (seconds this evaluation took),
    ``wall_time`` (seconds of evaluations since the run began, summed across
    resumes) and the record_fn fields.

    Raises :class:`DivergenceError` when an evaluation diverges; the checkpoint then
    keeps the last finite evaluation, marked as diverged.
    """
    n_iters, step_size, b1, b2, eps = _check_settings(n_iters, step_size, b1, b2, eps)
    state = adam_init(h0)
    h0 = state.params.copy()
    run_config = _run_config(config, h0, step_size, b1, b2, eps)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    expected_keys = None if record_keys is None else {*BASE_RECORD_KEYS, *map(str, record_keys)}

    grad, keys, rows, step_sizes, resumed_from = None, None, [], [], 0
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        remove_stale_temps(checkpoint)
        if os.path.lexists(checkpoint) and not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} is not a regular file; refusing "
                                  "to read or replace it")
    if resume:
        if checkpoint.exists():
            ckpt = load_checkpoint(checkpoint)
            _check_matches(checkpoint, ckpt, run_config, h0, n_iters, expected_keys)
            state, grad = ckpt["state"], ckpt["grad"]
            resumed_from = state.iteration
            keys = ckpt["record_keys"]
            rows = [list(r) for r in ckpt["records"]]
            step_sizes = ckpt["step_sizes"].tolist()
            logger.info("resuming from %s at meta-iteration %d of %d", checkpoint,
                        state.iteration, n_iters)
            if ckpt["diverged_at"]:
                logger.info("it diverged at meta-iteration %d with step size %r; the step "
                            "from meta-iteration %d is taken again with step size %r",
                            ckpt["diverged_at"], ckpt["run_config"]["optimizer"]["step_size"],
                            state.iteration, step_size)
        else:
            logger.warning("no checkpoint at %s to resume from; starting fresh", checkpoint)
    elif checkpoint is not None and checkpoint.exists():
        logger.info("overwriting the existing checkpoint %s (resume not requested)",
                    checkpoint)

    def add_record(record):
        nonlocal keys
        if keys is None:
            if expected_keys is not None and set(record) != expected_keys:
                raise ValueError(f"record_fn returned the fields {sorted(record)} (with the "
                                 f"base ones), record_keys declares {sorted(expected_keys)}")
            keys = tuple(record)
        elif set(record) != set(keys):
            raise CheckpointError(
                f"record fields {sorted(record)} differ from the checkpoint's "
                f"{sorted(keys)}" + (f" ({checkpoint})" if checkpoint is not None else ""))
        rows.append([record[k] for k in keys])

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_iters, initial=min(len(rows), n_iters), desc=desc, unit="it")
    try:
        wall = rows[-1][keys.index("wall_time")] if rows else 0.0
        previous = previous_grad = None  # h_{i-1}'s state and gradient, once stepped from
        while True:
            i = state.iteration
            if len(rows) == i:  # h_i is not evaluated yet (right after a resume it is)
                start = time.perf_counter()
                try:
                    value, grad, record = _evaluate(hyperloss_and_grad, record_fn,
                                                    state.params)
                except (FloatingPointError, OverflowError) as err:
                    kept = None
                    if checkpoint is not None and i > 0:
                        # The checkpoint on disk already holds h_{i-1}; mark it so that
                        # a resume may redo the step with a smaller step size.
                        _save_checkpoint(checkpoint, run_config, h0, previous, previous_grad,
                                         step_sizes[:-1], keys, rows, diverged_at=i)
                        kept = checkpoint
                    raise DivergenceError(i, step_size, kept, str(err)) from err
                elapsed = time.perf_counter() - start
                wall += elapsed
                record["iter_time"] = elapsed
                record["wall_time"] = wall
                add_record(record)
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, run_config, h0, state, grad, step_sizes,
                                     keys, rows)
                if bar is not None:
                    bar.set_postfix({loss_name: f"{value:.4f}"}, refresh=False)
                    if i < n_iters:
                        bar.update(1)
            if i == n_iters:
                break
            previous, previous_grad = state, grad
            state = adam_update(state, grad, step_size, b1, b2, eps)
            step_sizes.append(step_size)
    finally:
        if bar is not None:
            bar.close()
    records = {k: np.array([r[j] for r in rows], dtype=np.float64) for j, k in enumerate(keys)}
    return MetaResult(state.params.copy(), state, records, resumed_from,
                      np.array(step_sizes, dtype=np.float64))
