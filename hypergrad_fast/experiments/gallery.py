"""The ``all`` subcommand: every registered experiment in turn, then one HTML page.

``hypergrad-fast all --out DIR`` runs each experiment of
:data:`hypergrad_fast.experiments.EXPERIMENTS` (except ``all`` itself), and each
of :data:`VARIANTS` after its experiment, into ``DIR/NAME`` through the command
line's own path, :func:`hypergrad_fast.cli.main`,
so its exit code is the one a shell would see; a failed experiment is recorded and
the others still run. ``DIR/runs.json`` keeps each run's command, exit code, error
and wall time, and ``DIR/index.html`` shows every experiment's summary, figures and
status.

The page reads, from each ``DIR/NAME/results.json``: ``"experiment"`` (the name),
``"command"`` (the command line that made it), ``"summary"`` (numbers and strings,
possibly nested) and ``"figures"`` (a list of ``{"file": "x.png", "caption": "..."}``,
``file`` relative to ``DIR/NAME``). It references only files below ``DIR`` by
relative links, so it works offline and when ``DIR`` is moved or copied.

:func:`read_entries` and :func:`write_gallery` rebuild the page from the folders
without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Optional
from urllib.parse import quote, urlsplit

from ..metaopt import atomic_write
from ._args import ConfigError, Experiment, existing_folder, prepare_out_dir

__all__ = ["GalleryEntry", "Figure", "run_all", "read_entries", "load_entry",
           "write_gallery", "render_gallery", "flatten_summary", "format_value",
           "EXPERIMENT"]

NAME = "all"
INDEX = "index.html"
RUNS = "runs.json"
RESULTS = "results.json"
RUNS_VERSION = 1
#: Lists longer than this are left out of the summary table (with a note).
MAX_LIST = 20
#: Rows of one experiment's summary table at most; the rest is counted in a note.
MAX_ROWS = 300
#: Characters of a string value shown at most.
MAX_TEXT = 500
#: Gallery entries that run a registered experiment again with other flags:
#: entry name -> (subcommand, its extra arguments).  Each runs right after its
#: experiment, into OUT/ENTRY, when that experiment is registered.
VARIANTS = {"schedules-adam": ("schedules", ("--optimizer", "adam"))}


def _subcommand(name: str) -> str:
    """The subcommand that makes gallery entry ``name`` (its own name unless a variant)."""
    return VARIANTS[name][0] if name in VARIANTS else name


# --------------------------------------------------------------------------
# What the page shows of one experiment
# --------------------------------------------------------------------------

@dataclass
class Figure:
    """One figure of an experiment: ``file`` as results.json gives it (relative to
    the experiment's folder), its one-line ``caption``, and ``problem``: why it cannot
    be shown (None when it can)."""

    file: str
    caption: str
    problem: Optional[str] = None


@dataclass
class GalleryEntry:
    """Everything the page shows of one experiment (folder ``NAME`` below the page).

    status: "ok"; "incomplete" (results.json lacks some keys, see ``notes``);
        "failed" (nonzero ``exit_code``); "missing" (no readable results.json, the
        reason in ``notes``); "not run" (the run was interrupted before it).
    exit_code: the experiment's exit code, None when not recorded by this runner.
    error: the last message of a failed run (one or a few lines), or None.
    wall_s: the run's wall time in seconds, None when not recorded.
    command: the command line that made the results (results.json's, else the one
        this runner invoked), or None.
    summary: results.json's "summary" ({} when absent).
    figures: results.json's "figures", each checked.
    has_results: whether NAME/results.json exists (the page links to it).
    notes: problems worth telling the reader, one line each.
    """

    name: str
    status: str = "ok"
    exit_code: Optional[int] = None
    error: Optional[str] = None
    wall_s: Optional[float] = None
    command: Optional[str] = None
    summary: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    has_results: bool = False
    notes: list = field(default_factory=list)


def _check_figure_file(folder: Path, file) -> Optional[str]:
    """Why ``file`` (from results.json) cannot be shown from ``folder``, or None."""
    if not isinstance(file, str) or not file:
        return f"figure file must be a non-empty string, got {file!r}"
    parts = urlsplit(file)
    # A scheme or host would make the page fetch from elsewhere; a leading slash,
    # backslash or ".." would leave the output folder.
    if parts.scheme or parts.netloc or file.startswith(("/", "\\")) or "\\" in file:
        return f"figure file must be a relative path inside the folder, got {file!r}"
    if ".." in PurePosixPath(file).parts:
        return f"figure file must not leave the experiment's folder, got {file!r}"
    if not (folder / file).is_file():
        return f"figure file {file} does not exist"
    return None


def _read_figures(folder: Path, raw, notes: list) -> list:
    """Figures from results.json's "figures" value ``raw`` (appending to ``notes``)."""
    if raw is None:
        # Results written before the "figures" convention still have their plots.
        found = sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []
        if found:
            notes.append('results.json lists no "figures"; showing the PNG files in '
                         'its folder')
        return [Figure(name, "") for name in found]
    if not isinstance(raw, list):
        notes.append(f'"figures" in results.json is not a list ({type(raw).__name__})')
        return []
    figures = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            notes.append(f"figure {i} in results.json is not an object")
            continue
        file, caption = item.get("file"), item.get("caption", "")
        caption = caption if isinstance(caption, str) else str(caption)
        figures.append(Figure(str(file), caption, _check_figure_file(folder, file)))
    return figures


def load_entry(out_dir, name: str, run: Optional[dict] = None) -> GalleryEntry:
    """The entry of experiment ``name`` from ``out_dir/name/results.json`` and, when
    given, the runner's record ``run`` (a value of runs.json's "runs")."""
    folder = Path(out_dir) / name
    run = run if isinstance(run, dict) else {}
    entry = GalleryEntry(name)
    code = run.get("exit_code")
    entry.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
    entry.error = run.get("error") if isinstance(run.get("error"), str) else None
    wall = run.get("wall_s")
    entry.wall_s = float(wall) if isinstance(wall, (int, float)) else None
    entry.command = run.get("command") if isinstance(run.get("command"), str) else None
    path = folder / RESULTS
    entry.has_results = path.is_file()
    results, reason = None, None
    if not entry.has_results:
        reason = f"no {RESULTS} in {name}/"
    else:
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = f"{RESULTS} cannot be read: {err}"
        else:
            if not isinstance(results, dict):
                reason = f"{RESULTS} is not a JSON object"
                results = None
        started = run.get("started_epoch")
        # A run that failed early, or never started, leaves an earlier run's results.
        if run.get("status") == "not run" or (isinstance(started, (int, float))
                                              and path.stat().st_mtime < started):
            entry.notes.append(f"{RESULTS} is from an earlier run")
    if reason is not None:
        entry.notes.append(reason)
    missing = [] if results is None else _read_results(entry, folder, results)

    if run.get("status") == "not run":
        entry.status = "not run"
        entry.notes.insert(0, "not run: the run of all experiments was interrupted first")
    elif entry.exit_code not in (None, 0):
        entry.status = "failed"
    elif reason is not None:
        entry.status = "missing"
    elif missing:
        entry.status = "incomplete"
    return entry


def _read_results(entry: GalleryEntry, folder: Path, results: dict) -> list:
    """Fill ``entry`` from the results.json object ``results``; the keys it lacks."""
    name = entry.name
    missing = [key for key in ("experiment", "command", "summary", "figures")
               if key not in results]
    if missing:
        entry.notes.append(f"{RESULTS} has no " + ", ".join(f'"{k}"' for k in missing))
    if "experiment" in results and results["experiment"] != _subcommand(name):
        entry.notes.append(f'{RESULTS} says "experiment": {results["experiment"]!r}, '
                           f"not {_subcommand(name)!r}")
    if isinstance(results.get("command"), str):
        entry.command = results["command"]
    summary = results.get("summary", {})
    if isinstance(summary, dict):
        entry.summary = summary
    else:
        entry.notes.append(f'"summary" in {RESULTS} is not an object')
    entry.figures = _read_figures(folder, results.get("figures"), entry.notes)
    return missing


def _read_runs(out_dir) -> dict:
    """runs.json's "runs" (name -> record), {} when absent or unreadable."""
    try:
        runs = json.loads((Path(out_dir) / RUNS).read_text(encoding="utf-8")).get("runs")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return runs if isinstance(runs, dict) else {}


def read_entries(out_dir) -> list:
    """Entries of every experiment below ``out_dir``: those in runs.json (in the order
    run), then every other subfolder holding a results.json (by name)."""
    out = Path(out_dir)
    runs = _read_runs(out)
    names = [n for n in runs if isinstance(n, str) and _safe_name(n)]
    if out.is_dir():
        names += sorted(p.name for p in out.iterdir()
                        if p.name not in runs and (p / RESULTS).is_file())
    return [load_entry(out, n, runs.get(n)) for n in names]


def _safe_name(name: str) -> bool:
    """Whether ``name`` is one plain folder name (a runs.json could say anything)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


# --------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------

def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _is_matrix(value) -> bool:
    """A non-empty list of equally long, non-empty lists of numbers."""
    return (len(value) > 0 and all(isinstance(row, (list, tuple)) for row in value)
            and len({len(row) for row in value}) == 1 and len(value[0]) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                    for row in value for v in row))


def format_value(value) -> str:
    """A JSON scalar as the table shows it: floats to 5 significant digits (in
    exponent form outside [0.001, 100000)), integers exact, strings cut at
    :data:`MAX_TEXT` characters."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e5:
            return f"{value:.5g}"
        return f"{value:.4e}"
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def flatten_summary(summary: dict) -> list:
    """(key, text) rows of ``summary``: nested objects as "key.subkey", lists of up to
    :data:`MAX_LIST` scalars on one row, longer lists as a note, a matrix (a list of
    equally long lists of numbers) as a note of its shape, lists of objects as
    "key[i].subkey"; at most :data:`MAX_ROWS` rows (then a row counting the rest)."""
    rows = []

    def add(key, value):
        if isinstance(value, dict):
            if not value and key:  # an empty nested object; an empty summary has no rows
                rows.append((key, "{}"))
            for k, v in value.items():
                add(f"{key}.{k}" if key else str(k), v)
        elif isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST:
                kind = "numbers" if all(isinstance(v, (int, float)) for v in value) \
                    else "values"
                rows.append((key, f"(list of {len(value)} {kind}, not shown)"))
            elif all(_is_scalar(v) for v in value):
                rows.append((key, "[" + ", ".join(format_value(v) for v in value) + "]"))
            elif _is_matrix(value):
                rows.append((key, f"({len(value)} x {len(value[0])} matrix, in results.json)"))
            else:
                for i, v in enumerate(value):
                    add(f"{key}[{i}]", v)
        else:
            rows.append((key, format_value(value)))

    add("", summary)
    if len(rows) > MAX_ROWS:
        rows = rows[:MAX_ROWS] + [("…", f"({len(rows) - MAX_ROWS} more rows not shown)")]
    return rows


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
td.num { font-family: monospace; font-size: 1.05em; vertical-align: middle; }
code { background: #f4f4f4; padding: 0.1em 0.3em; word-break: break-all; }
pre { background: #fbeaea; padding: 0.5em; white-space: pre-wrap; }
.ok { color: #1a7f37; font-weight: bold; }
.failed, .missing, .notrun { color: #b3261e; font-weight: bold; }
.incomplete { color: #9a6700; font-weight: bold; }
.note { color: #9a6700; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; max-width: 100%;
         vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92em; color: #444; max-width: 40em; }
.meta { color: #555; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _href(name: str, file: str) -> str:
    """The relative URL of ``file`` in folder ``name``, escaped for an attribute."""
    return _e(quote(f"{name}/{file}"))


def _status_html(entry: GalleryEntry) -> str:
    css = {"not run": "notrun"}.get(entry.status, entry.status)
    text = entry.status
    if entry.status == "failed":
        text = f"failed (exit code {entry.exit_code})"
    elif entry.status == "ok" and entry.exit_code is None:
        text = "ok (exit code not recorded)"
    return f'<span class="{_e(css)}">{_e(text)}</span>'


def _wall_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _section(entry: GalleryEntry) -> list:
    name = entry.name
    out = [f'<section id="{_e("exp-" + name)}">', f"<h2>{_e(name)}</h2>",
           f'<p class="meta">Status: {_status_html(entry)} &middot; wall time: '
           f"{_e(_wall_text(entry.wall_s))}"]
    if entry.has_results:
        out.append(f' &middot; <a href="{_href(name, RESULTS)}">{_e(RESULTS)}</a>')
    out.append("</p>")
    if entry.command:
        out.append(f"<p>Command: <code>{_e(entry.command)}</code></p>")
    if entry.error:
        out.append(f"<pre>{_e(entry.error)}</pre>")
    for note in entry.notes:
        out.append(f'<p class="note">{_e(note)}</p>')
    rows = flatten_summary(entry.summary)
    if rows:
        out.append("<table><tr><th>summary</th><th>value</th></tr>")
        out += [f'<tr><td>{_e(k)}</td><td class="num">{_e(v)}</td></tr>' for k, v in rows]
        out.append("</table>")
    for fig in entry.figures:
        if fig.problem:
            out.append(f'<p class="note">Figure not shown: {_e(fig.problem)}'
                       + (f" ({_e(fig.caption)})" if fig.caption else "") + "</p>")
            continue
        src = _href(name, fig.file)
        out.append(f'<figure><a href="{src}"><img src="{src}" alt="{_e(fig.caption or fig.file)}"'
                   f' loading="lazy"></a><figcaption>{_e(fig.caption or fig.file)}'
                   "</figcaption></figure>")
    out.append("</section>")
    return out


def render_gallery(entries, *, title: str = "hypergrad-fast experiments",
                   generated: Optional[datetime] = None,
                   command: Optional[str] = None) -> str:
    """The HTML of the page for ``entries`` (:class:`GalleryEntry`), dated
    ``generated`` (default: now, UTC); ``command``: the one that made the page."""
    generated = generated or datetime.now(timezone.utc)
    stamp = generated.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    n_ok = sum(e.status == "ok" for e in entries)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{_e(title)}</h1>",
           f'<p class="meta">Generated {_e(stamp)}; {n_ok} of {len(entries)} '
           "experiments ok.</p>"]
    if command:
        out.append(f"<p>Command: <code>{_e(command)}</code></p>")
    if not entries:
        out.append("<p>No experiments found.</p>")
    else:
        out.append("<table><tr><th>experiment</th><th>status</th><th>wall time</th>"
                   "<th>figures</th><th>results</th></tr>")
        for e in entries:
            link = (f'<a href="{_href(e.name, RESULTS)}">{_e(RESULTS)}</a>'
                    if e.has_results else "—")
            shown = sum(f.problem is None for f in e.figures)
            out.append(f'<tr><td><a href="#{_e("exp-" + e.name)}">{_e(e.name)}</a>'
                       f"</td><td>{_status_html(e)}</td><td>{_e(_wall_text(e.wall_s))}</td>"
                       f"<td>{shown}</td><td>{link}</td></tr>")
        out.append("</table>")
    for e in entries:
        out += _section(e)
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_gallery(out_dir, entries, **kwargs) -> Path:
    """Write ``out_dir/index.html`` for ``entries`` (see :func:`read_entries`) at once
    (temporary file, then rename); returns its path. ``kwargs`` go to
    :func:`render_gallery`."""
    path = Path(out_dir) / INDEX
    text = render_gallery(entries, **kwargs)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------

class _TailTee:
    """A text stream that passes everything to ``stream`` and keeps its last
    ``keep`` characters (the error message an experiment's CLI prints last)."""

    def __init__(self, stream, keep: int = 8000):
        self.stream, self.keep, self.tail = stream, keep, ""

    def write(self, text):
        self.stream.write(text)
        self.tail = (self.tail + text)[-self.keep:]
        return len(text)

    def __getattr__(self, name):
        # flush, isatty, encoding, fileno...: as the stream behind it.
        return getattr(self.stream, name)


def _last_message(tail: str, name: str) -> Optional[str]:
    """The CLI's closing message in stderr text ``tail``: from the last line starting
    ``hypergrad-fast NAME`` (how the CLI and argparse label errors) to the end, else
    the last three lines."""
    from ..cli import PROG
    # Progress bars redraw with carriage returns: each redraw is a line here.
    lines = [ln.rstrip() for ln in tail.replace("\r", "\n").split("\n") if ln.strip()]
    if not lines:
        return None
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(f"{PROG} {name}")]
    return "\n".join(lines[starts[-1]:] if starts else lines[-3:])


def experiment_argv(name: str, out, *, quick: bool = False, data=None,
                    progress: bool = True) -> list:
    """The command-line arguments that run experiment ``name`` (or variant, see
    :data:`VARIANTS`) into folder ``out``."""
    command, extra = VARIANTS.get(name, (name, ()))
    argv = [command, "--out", str(out), *extra]
    if quick:
        argv.append("--quick")
    if data is not None:
        argv += ["--data", str(data)]
    if not progress:
        argv.append("--no-progress")
    return argv


def _run_one(argv: list, name: str) -> tuple:
    """Run ``hypergrad-fast ARGV`` in this process; (exit code, error message or None)."""
    from ..cli import main
    tee = _TailTee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            code = main(argv)
    except SystemExit as exc:  # argparse rejected the arguments (it printed why)
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001 - one experiment's bug must not stop the rest
        traceback.print_exc()
        return 1, f"{type(exc).__name__}: {exc}"
    code = 0 if code is None else code
    return code, (_last_message(tee.tail, _subcommand(name)) if code else None)


def _write_runs(out: Path, runs: dict) -> None:
    text = json.dumps({"runs_version": RUNS_VERSION, "runs": runs}, indent=1)
    atomic_write(out / RUNS, lambda f: f.write(text.encode("utf-8")))


def run_all(out_dir, names=None, *, quick: bool = False, data=None,
            progress: bool = True, log: Optional[Callable] = None) -> tuple:
    """Run experiments ``names`` (default: every registered one but ``all``, each
    followed by its :data:`VARIANTS`) into ``out_dir/NAME``, one after another, each
    through the CLI; then write ``out_dir/index.html``. Returns (entries, interrupted).

    Records every run in ``out_dir/runs.json`` as it finishes (records of experiments
    not run now are kept, so the page still shows them). On Ctrl-C the page is written
    with the experiments not reached marked "not run", and ``interrupted`` is True.
    """
    from . import EXPERIMENTS
    from ..cli import PROG
    log = log or (lambda msg: None)
    known = [n for n in EXPERIMENTS if n != NAME]
    for variant, (command, _) in VARIANTS.items():
        if command in known:
            known.insert(known.index(command) + 1, variant)
    names = list(dict.fromkeys(known if names is None else names))  # each once
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown experiment(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(known) or '(none)'}")
    out = prepare_out_dir(out_dir)
    runs = _read_runs(out)
    interrupted = False
    for i, name in enumerate(names):
        argv = experiment_argv(name, out / name, quick=quick, data=data, progress=progress)
        record = {"command": shlex.join([PROG, *argv]), "argv": argv,
                  "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "started_epoch": time.time()}
        if interrupted:
            runs[name] = {**record, "status": "not run"}
            continue
        log(f"=== [{i + 1}/{len(names)}] {record['command']}")
        start = time.perf_counter()
        code, error = _run_one(argv, name)
        record.update(exit_code=code, error=error, wall_s=time.perf_counter() - start)
        # The CLI turns Ctrl-C into exit code 130; stop there as a shell would.
        interrupted = code == 130
        runs[name] = record
        _write_runs(out, runs)
        log(f"=== {name}: " + ("ok" if code == 0 else f"failed (exit code {code})")
            + f" in {_wall_text(record['wall_s'])}")
    _write_runs(out, runs)
    entries = read_entries(out)
    command = shlex.join([PROG, NAME, "--out", str(out_dir)]
                         + (["--quick"] if quick else [])
                         + (["--data", str(data)] if data is not None else [])
                         + ([] if progress else ["--no-progress"])
                         + (["--only", ",".join(names)] if names != known else []))
    write_gallery(out, entries, command=command)
    return entries, interrupted


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected experiment names like schedules,NAME")
    return names


def add_parser(sub):
    """The ``all`` subcommand's parser, added to ``sub``."""
    p = sub.add_parser(
        NAME, help="run every experiment, then write an HTML gallery of the results",
        description=(
            "Run every registered experiment, each into OUT/NAME as its own subcommand "
            "would, carrying on past failures; then write OUT/index.html, a page (no "
            "internet needed) with each experiment's summary, figures, command, status "
            "and wall time, and OUT/runs.json, the record of each run."))
    p.add_argument("--out", default="out/all", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="pass --quick to every experiment")
    p.add_argument("--data", type=existing_folder, default=None, metavar="DIR",
                   help="pass --data DIR to every experiment (the MNIST IDX folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--only", type=_names, default=None, metavar="NAME,NAME",
                   help="run only these experiments (the page still shows earlier "
                        "runs in OUT)")
    return p


def run_cli(args) -> int:
    """Run the subcommand from parsed ``args``; 0 when every experiment succeeded,
    1 when some failed, 130 when interrupted."""
    start = time.perf_counter()
    entries, interrupted = run_all(args.out, args.only, quick=args.quick, data=args.data,
                                   progress=not args.no_progress, log=print)
    ran = set(args.only) if args.only else None
    shown = [e for e in entries if ran is None or e.name in ran]
    print(f"\nall done in {_wall_text(time.perf_counter() - start)}:")
    for e in shown:
        status = f"failed (exit code {e.exit_code})" if e.status == "failed" else e.status
        print(f"  {e.name:20s} {status}")
    print(f"  gallery: {Path(args.out) / INDEX}")
    if interrupted:
        return 130
    return 0 if all(e.exit_code == 0 for e in shown) else 1


EXPERIMENT = Experiment(NAME, add_parser, run_cli)
