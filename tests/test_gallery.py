"""The ``all`` runner and its HTML gallery, on fake experiment folders and a fake
registry (no training runs)."""

import json
import os
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import hypergrad_fast.experiments as registry
from hypergrad_fast.cli import main
from hypergrad_fast.experiments import gallery
from hypergrad_fast.experiments._args import ConfigError, Experiment


def png_1x1() -> bytes:
    """A valid 1x1 8-bit greyscale PNG."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def make_experiment(out, name, *, summary=None, figures=(), command=None, extra=None,
                    pngs=None):
    """A fake experiment folder out/name with results.json and its PNG files."""
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    figures = [{"file": f, "caption": c} for f, c in figures]
    for f in pngs if pngs is not None else [f["file"] for f in figures]:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes(png_1x1())
    results = {"experiment": name,
               "command": command or f"hypergrad-fast {name} --out {folder}",
               "summary": summary if summary is not None else {}, "figures": figures}
    results.update(extra or {})
    (folder / "results.json").write_text(json.dumps(results))
    return folder


class PageParser(HTMLParser):
    """Every tag with its attributes, every id, and the text of the page."""

    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> PageParser:
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    parser.page_text = "".join(parser.text)
    return parser


def check_offline(page: PageParser, out: Path):
    """Every link of the page is relative and names a file below ``out`` (or an id of
    the page), and nothing is fetched from elsewhere."""
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base"}, tags
    for tag, attrs in page.tags:
        assert "url(" not in attrs.get("style", "") and "srcset" not in attrs
        for key in ("src", "href"):
            if key not in attrs:
                continue
            url = attrs[key]
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, url
            assert not url.startswith(("/", "\\")), url
            if url.startswith("#"):
                assert url[1:] in page.ids, url
                continue
            target = out / unquote(parts.path)
            assert target.resolve().is_relative_to(out.resolve()), url
            assert target.is_file(), url
    assert "url(" not in page.page_text and "@import" not in page.page_text


def test_the_offline_check_catches_outside_links(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for folder in (tmp_path, out):  # ../a.png exists, but outside the page's folder
        (folder / "a.png").write_bytes(png_1x1())
    good = PageParser()
    good.feed('<img src="a.png">')
    good.page_text = ""
    check_offline(good, out)
    for bad in ('<img src="/a.png">', '<img src="https://example.com/a.png">',
                '<img src="//example.com/a.png">', '<a href="../a.png">x</a>',
                '<img src="missing.png">', '<script src="a.png"></script>',
                '<div style="background: url(a.png)"></div>', '<a href="#nowhere">x</a>'):
        page = PageParser()
        page.feed(f'<img src="a.png">{bad}')
        page.page_text = ""
        with pytest.raises(AssertionError):
            check_offline(page, out)


def srcs(page):
    return [a["src"] for tag, a in page.tags if tag == "img"]


# --------------------------------------------------------------------------
# The page, from folders
# --------------------------------------------------------------------------

def test_gallery_of_fake_folders(tmp_path):
    make_experiment(tmp_path, "alpha",
                    summary={"final_loss": 0.123456789, "n_params": 4242,
                             "errors": {"valid": 0.0712, "test": 0.0834},
                             "small": [1, 2.5, 3], "big": list(range(100)),
                             "blocks": [{"name": "W0", "scale": 1e-7}],
                             "label": "tanh MLP"},
                    figures=[("curve.png", "Learning curve of alpha"),
                             ("sub/more.png", "A figure in a subfolder")])
    make_experiment(tmp_path, "beta", summary={"speedup": 12.5},
                    figures=[("speed plot.png", "Speed with a space in the name")])
    path = gallery.write_gallery(tmp_path, gallery.read_entries(tmp_path))
    assert path == tmp_path / "index.html"
    page = parse(path)
    check_offline(page, tmp_path)
    assert sorted(srcs(page)) == ["alpha/curve.png", "alpha/sub/more.png",
                                  "beta/speed%20plot.png"]
    text = page.page_text
    for expected in ("Learning curve of alpha", "A figure in a subfolder",
                     "Speed with a space in the name",
                     "final_loss", "0.12346", "4242", "errors.valid", "0.0712",
                     "errors.test", "[1, 2.5, 3]", "blocks[0].scale", "1.0000e-07",
                     "tanh MLP", "speedup", "12.5", "list of 100 numbers, not shown",
                     "hypergrad-fast alpha --out", "2 experiments ok"):
        assert expected in text, expected
    hrefs = {a.get("href") for _, a in page.tags}
    assert {"alpha/results.json", "beta/results.json"} <= hrefs
    assert not list(tmp_path.glob(".index.html.*"))  # no temporary file left


def test_missing_invalid_and_failed_are_shown(tmp_path):
    make_experiment(tmp_path, "good", summary={"x": 1.0}, figures=[("a.png", "fine")])
    (tmp_path / "nojson").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    make_experiment(tmp_path, "partial", summary={"y": 2}, figures=[
        ("gone.png", "a figure whose file is missing"),
        ("/etc/passwd", "absolute"), ("../good/a.png", "escapes"),
        ("https://example.com/x.png", "remote")], pngs=[])
    runs = {"good": {"exit_code": 0, "wall_s": 75.0},
            "nojson": {"exit_code": 0, "wall_s": 1.0},
            "broken": {"exit_code": 0},
            "partial": {"exit_code": 0},
            "crashed": {"exit_code": 2, "error": "hypergrad-fast crashed: error: no data",
                        "command": "hypergrad-fast crashed --out x"}}
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    entries = {e.name: e for e in gallery.read_entries(tmp_path)}
    assert list(entries) == ["good", "nojson", "broken", "partial", "crashed"]
    assert entries["good"].status == "ok"
    assert entries["nojson"].status == "missing"
    assert entries["broken"].status == "missing"
    assert "cannot be read" in " ".join(entries["broken"].notes)
    assert entries["crashed"].status == "failed"
    assert entries["crashed"].exit_code == 2
    problems = [f.problem for f in entries["partial"].figures]
    assert all(problems) and len(problems) == 4

    page = parse(gallery.write_gallery(tmp_path, list(entries.values())))
    check_offline(page, tmp_path)
    text = page.page_text
    assert srcs(page) == ["good/a.png"]
    for expected in ("failed (exit code 2)", "no data", "hypergrad-fast crashed --out x",
                     "no results.json in nojson/", "missing", "1 min 15 s",
                     "figure file gone.png does not exist", "a figure whose file is missing",
                     "must be a relative path", "must not leave"):
        assert expected in text, expected
    # No results.json: no link to one, and no empty summary table.
    assert "nojson/results.json" not in {a.get("href") for _, a in page.tags}
    assert sum(tag == "table" for tag, _ in page.tags) == 1 + 2  # overview, good, partial


def test_missing_keys_and_old_results(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "plot.png").write_bytes(png_1x1())
    (folder / "results.json").write_text(json.dumps({"experiment": "old", "loss": 1}))
    entry = gallery.load_entry(tmp_path, "old")
    assert entry.status == "incomplete"
    assert '"command", "summary", "figures"' in entry.notes[0]
    # Results from before the "figures" convention still show their plots.
    assert [f.file for f in entry.figures] == ["plot.png"]
    later = os.path.getmtime(folder / "results.json") + 10
    failed = gallery.load_entry(tmp_path, "old", {"exit_code": 1, "started_epoch": later})
    assert failed.status == "failed"
    assert any("earlier run" in n for n in failed.notes)


def test_text_is_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    make_experiment(tmp_path, "evil", summary={evil: evil, "ok": 1},
                    figures=[("p.png", evil)], command=f"hypergrad-fast evil {evil}")
    raw = gallery.write_gallery(tmp_path, gallery.read_entries(tmp_path)).read_text()
    assert "<script" not in raw
    assert "&lt;script&gt;" in raw
    page = parse(tmp_path / "index.html")
    check_offline(page, tmp_path)
    assert evil in page.page_text  # shown as text, not run


def test_format_and_flatten():
    f = gallery.format_value
    assert f(0.1234567) == "0.12346" and f(3.0) == "3" and f(0.0) == "0"
    assert f(1.5e-9) == "1.5000e-09" and f(123456789.0) == "1.2346e+08"
    assert f(float("nan")) == "nan" and f(True) == "true" and f(None) == "null"
    assert f(12345678901) == "12345678901"
    rows = dict(gallery.flatten_summary({"a": {"b": {"c": 1}}, "l": [0.5] * 21,
                                         "m": ["x", None], "e": {}}))
    assert rows == {"a.b.c": "1", "l": "(list of 21 numbers, not shown)",
                    "m": "[x, null]", "e": "{}"}
    assert gallery.flatten_summary({}) == []
    # A matrix (multitask's sharing) is one row; ragged or mixed lists are not matrices.
    rows = dict(gallery.flatten_summary({"s": {"layer0": [[1.0, 0.5], [0.5, 1.0]]},
                                         "r": [[1, 2], [3]], "o": [{"a": 1}]}))
    assert rows == {"s.layer0": "(2 x 2 matrix, in results.json)", "r[0]": "[1, 2]",
                    "r[1]": "[3]", "o[0].a": "1"}
    many = gallery.flatten_summary({f"k{i}": i for i in range(gallery.MAX_ROWS + 5)})
    assert len(many) == gallery.MAX_ROWS + 1 and "5 more rows" in many[-1][1]


def test_empty_folder(tmp_path):
    page = parse(gallery.write_gallery(tmp_path, gallery.read_entries(tmp_path)))
    assert "No experiments found" in page.page_text


# --------------------------------------------------------------------------
# The runner, on a fake registry
# --------------------------------------------------------------------------

def fake_experiment(name, behaviour):
    """An Experiment whose run records its arguments in a results.json with one figure,
    then returns 0 ("ok"), or raises ConfigError ("config") or RuntimeError ("bug")
    before writing anything."""
    def add_parser(sub):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--quick", action="store_true")
        p.add_argument("--data", default=None)
        p.add_argument("--no-progress", action="store_true")
        return p

    def run(args):
        if behaviour == "config":
            raise ConfigError(f"{name} cannot run <script>")
        if behaviour == "bug":
            raise RuntimeError(f"{name} has a bug")
        make_experiment(Path(args.out).parent, name,
                        summary={"quick": args.quick, "data": args.data,
                                 "progress": not args.no_progress, "loss": 0.25},
                        figures=[("fig.png", f"figure of {name}")])
        return 0

    return Experiment(name, add_parser, run)


@pytest.fixture
def fake_registry(monkeypatch):
    experiments = {"alpha": fake_experiment("alpha", "ok"),
                   "beta": fake_experiment("beta", "config"),
                   "gamma": fake_experiment("gamma", "bug"),
                   "all": gallery.EXPERIMENT}
    monkeypatch.setattr(registry, "EXPERIMENTS", experiments)
    return experiments


def test_all_runs_every_experiment_and_carries_on(tmp_path, fake_registry, capsys):
    out = tmp_path / "all"
    code = main(["all", "--out", str(out), "--quick", "--no-progress",
                 "--data", str(tmp_path)])
    assert code == 1
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert list(runs) == ["alpha", "beta", "gamma"]  # not "all" itself
    assert runs["alpha"]["argv"] == ["alpha", "--out", str(out / "alpha"), "--quick",
                                     "--data", str(tmp_path), "--no-progress"]
    assert [runs[n]["exit_code"] for n in runs] == [0, 2, 1]
    assert "beta cannot run" in runs["beta"]["error"]
    assert runs["gamma"]["error"] == "RuntimeError: gamma has a bug"
    results = json.loads((out / "alpha" / "results.json").read_text())
    assert results["summary"]["quick"] is True
    assert results["summary"]["data"] == str(tmp_path)
    assert results["summary"]["progress"] is False

    page = parse(out / "index.html")
    check_offline(page, out)
    text = page.page_text
    assert srcs(page) == ["alpha/fig.png"]
    for expected in ("figure of alpha", "0.25", "failed (exit code 2)",
                     "failed (exit code 1)", "beta cannot run <script>",
                     "gamma has a bug", "1 of 3 experiments ok",
                     f"hypergrad-fast beta --out {out / 'beta'} --quick"):
        assert expected in text, expected
    assert "<script>" not in (out / "index.html").read_text()
    assert "gallery:" in capsys.readouterr().out


def test_all_only_keeps_earlier_records(tmp_path, fake_registry):
    out = tmp_path / "all"
    assert main(["all", "--out", str(out), "--only", "beta", "--no-progress"]) == 1
    assert main(["all", "--out", str(out), "--only", "alpha", "--no-progress"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert list(runs) == ["beta", "alpha"]
    entries = {e.name: e.status for e in gallery.read_entries(out)}
    assert entries == {"beta": "failed", "alpha": "ok"}
    assert "--quick" not in runs["alpha"]["argv"]


def test_all_rejects_unknown_names(tmp_path, fake_registry, capsys):
    assert main(["all", "--out", str(tmp_path), "--only", "alpha,nope,all"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "alpha, beta, gamma" in err
    assert not (tmp_path / "runs.json").exists()


def test_all_stops_when_interrupted(tmp_path, fake_registry):
    def interrupted(args):
        raise KeyboardInterrupt
    fake_registry["alpha"] = fake_registry["alpha"]._replace(run=interrupted)
    out = tmp_path / "all"
    assert main(["all", "--out", str(out), "--no-progress"]) == 130
    entries = {e.name: e.status for e in gallery.read_entries(out)}
    assert entries == {"alpha": "failed", "beta": "not run", "gamma": "not run"}
    assert "not run" in parse(out / "index.html").page_text


def test_registered_like_the_others():
    assert gallery.EXPERIMENT.name == "all"
    assert gallery.EXPERIMENT.run is gallery.run_cli
