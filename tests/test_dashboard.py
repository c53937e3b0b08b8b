"""bench/dashboard.py: CDN scripts of the asv dashboard copied into html/vendor.

No network: the download cache is filled by hand with small fake files whose
sha384 is computed here, and the one download test hands in a fake HTTP GET
that returns an npm-style tarball built in memory.
"""

import io
import re
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a package beside hypergrad_fast/, not installed

from bench import dashboard as d  # noqa: E402

JQUERY = "https://code.jquery.com/jquery-3.3.1.min.js"
ORDERBARS = "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js"
CSS = "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css"
MD5 = "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js"

#: CDN URL -> (npm file it comes from, fake content)
FILES = {
    JQUERY: (d.Source("jquery", "3.3.1", "dist/jquery.min.js"), b"window.jQuery = 1;\n"),
    ORDERBARS: (d.Source("flot-orderbars", "1.0.0", "js/jquery.flot.orderBars.js"), b"/* bars */\n"),
    CSS: (d.Source("bootstrap", "3.1.1", "dist/css/bootstrap.min.css"), b"body{margin:0}\n"),
    MD5: (d.Source("blueimp-md5", "2.19.0", "js/md5.min.js"), b"function md5(){}\n"),
}

PAGE = """<!DOCTYPE html>
<html>
  <head>
    <script src="{JQUERY}" integrity="{h[JQUERY]}" crossorigin="anonymous" onerror="js_load_failure()"></script>
    <script src="{ORDERBARS}" integrity="sha256-notthis= {h[ORDERBARS]}" crossorigin="anonymous"></script>
    <script src="{MD5}" integrity="{h[MD5]}" referrerpolicy="no-referrer"></script>
    <script type="text/javascript" src="asv.js"></script>
    <link rel="stylesheet" href="{CSS}" integrity="{h[CSS]}" crossorigin="anonymous">
    <link rel="alternate" type="application/atom+xml" href="https://example.org/feed.xml"/>
    <script src="{JQUERY}" integrity="{h[JQUERY]}"></script>
  </head>
  <body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body>
</html>
"""


def page(hashes=None):
    hashes = hashes or {url: d.integrity_of(data) for url, (_, data) in FILES.items()}
    return PAGE.format(JQUERY=JQUERY, ORDERBARS=ORDERBARS, MD5=MD5, CSS=CSS,
                       h={name: hashes[url] for name, url in
                          [("JQUERY", JQUERY), ("ORDERBARS", ORDERBARS), ("MD5", MD5), ("CSS", CSS)]})


def no_network(url):
    raise AssertionError(f"tried to download {url}")


@pytest.fixture
def site(tmp_path):
    """(html dir with the page and an error.html, cache dir holding every file)."""
    html_dir, cache = tmp_path / "html", tmp_path / "cache"
    html_dir.mkdir()
    (html_dir / "index.html").write_text(page())
    (html_dir / "error.html").write_text("<html><body>swallow</body></html>\n")
    for source, data in FILES.values():
        path = d.cached_path(cache, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return html_dir, cache


def local_tags(text):
    """(tag name, attrs) of every script/link start tag in the text."""
    return [(m.group(1), dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(0))))
            for m in re.finditer(r"<(script|link)\b[^>]*>", text)]


def test_vendors_cached_files_offline(site):
    html_dir, cache = site
    before = (html_dir / "index.html").read_text()
    done = d.vendor_html_dir(html_dir, cache, offline=True, substitutes={}, get=no_network)

    assert {v.url for v in done} == set(FILES) and not any(v.substitute for v in done)
    after = (html_dir / "index.html").read_text()
    assert d.external_tags(after) == []  # no script or stylesheet left on a CDN
    seen = set()
    for name, attrs in local_tags(after):
        url = attrs.get("data-vendored-from")
        if url is None:
            continue
        seen.add(url)
        ref = attrs["src" if name == "script" else "href"]
        assert ref.startswith("vendor/") and not ref.startswith("/")
        source, data = FILES[url]
        assert ref == f"vendor/{source.package}@{source.version}/{source.path}"
        assert (html_dir / ref).read_bytes() == data
        assert d.matches_integrity(data, attrs["integrity"])
        assert attrs["integrity"] in before  # kept as asv wrote it
    assert seen == set(FILES)
    # Other attributes stay; local scripts, feeds and links are untouched.
    assert 'onerror="js_load_failure()"' in after and 'referrerpolicy="no-referrer"' in after
    assert '<script type="text/javascript" src="asv.js"></script>' in after
    assert 'href="https://example.org/feed.xml"' in after
    assert '<a href="https://github.com/airspeed-velocity/asv/">' in after
    assert after.count("vendor/jquery@3.3.1/dist/jquery.min.js") == 2
    assert (html_dir / "error.html").read_text() == "<html><body>swallow</body></html>\n"

    # A second run finds nothing left to vendor and changes nothing.
    assert d.vendor_html_dir(html_dir, cache, offline=True, get=no_network) == []
    assert (html_dir / "index.html").read_text() == after


def test_hash_mismatch_raises_and_changes_nothing(site):
    html_dir, cache = site
    source, data = FILES[MD5]
    d.cached_path(cache, source).write_bytes(data + b" ")
    before = (html_dir / "index.html").read_text()
    with pytest.raises(d.VendorError, match=re.escape(MD5)) as err:
        d.vendor_html_dir(html_dir, cache, offline=True, substitutes={}, get=no_network)
    assert "\n" not in str(err.value)
    assert (html_dir / "index.html").read_text() == before
    assert not (html_dir / "vendor").exists()


def test_missing_file_offline_is_one_line_error(site):
    html_dir, cache = site
    d.cached_path(cache, FILES[CSS][0]).unlink()
    with pytest.raises(d.VendorError, match="bootstrap@3.1.1/dist/css/bootstrap.min.css") as err:
        d.vendor_html_dir(html_dir, cache, offline=True, substitutes={}, get=no_network)
    assert "offline" in str(err.value) and "\n" not in str(err.value)

    # The command line says the same in one line and exits 1.
    code = d.main(["--no-publish", "--offline", "--html-dir", str(html_dir), "--cache-dir", str(cache)])
    assert code == 1


def test_substitute_is_checked_against_its_pinned_hash(site):
    html_dir, cache = site
    stand_in = d.Source("flot-orderbars", "1.0.0", "js/orderBars.src.js")
    data = b"/* the unminified bars */\n"
    path = d.cached_path(cache, stand_in)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    subs = {ORDERBARS: d.Substitute(stand_in, d.integrity_of(data))}

    done = d.vendor_html_dir(html_dir, cache, offline=True, substitutes=subs, get=no_network)
    assert [v.url for v in done if v.substitute] == [ORDERBARS]
    assert d.external_tags((html_dir / "index.html").read_text()) == []
    attrs = next(a for _, a in local_tags((html_dir / "index.html").read_text())
                 if a.get("data-vendored-from") == ORDERBARS)
    assert attrs["src"] == "vendor/flot-orderbars@1.0.0/js/orderBars.src.js"
    assert attrs["integrity"] == d.integrity_of(data)  # the pinned hash, not the CDN's

    # A stand-in that does not match its pinned hash is refused.
    (html_dir / "index.html").write_text(page())
    path.write_bytes(data + b"!")
    with pytest.raises(d.VendorError, match="does not match"):
        d.vendor_html_dir(html_dir, cache, offline=True, substitutes=subs, get=no_network)


def npm_tarball(files):
    """An npm-style .tgz: every file under the top folder "package/"."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("package/" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_fills_cache_then_offline_works(site, tmp_path):
    html_dir, _ = site
    cache = tmp_path / "empty-cache"
    tarballs = {}
    for source, data in FILES.values():
        tarballs.setdefault((source.package, source.version), {})[source.path] = data
    by_url = {d.tarball_url(p, v, d.NPM_REGISTRY): npm_tarball(f) for (p, v), f in tarballs.items()}
    fetched = []

    def fake_get(url):
        fetched.append(url)
        return by_url[url]

    d.vendor_html_dir(html_dir, cache, substitutes={}, get=fake_get)
    assert sorted(fetched) == sorted(by_url)  # one tarball per package, nothing else
    assert "https://registry.npmjs.org/jquery/-/jquery-3.3.1.tgz" in fetched
    for source, data in FILES.values():
        assert d.cached_path(cache, source).read_bytes() == data

    (html_dir / "index.html").write_text(page())
    assert len(d.vendor_html_dir(html_dir, cache, offline=True, substitutes={}, get=no_network)) == 4


def test_tarball_without_the_file_and_unreachable_registry(site, tmp_path):
    html_dir, _ = site

    def wrong_tarball(url):
        return npm_tarball({"README.md": b"hi"})

    with pytest.raises(d.VendorError, match="has no file"):
        d.vendor_html_dir(html_dir, tmp_path / "c1", substitutes={}, get=wrong_tarball)

    def unreachable(url):
        raise OSError("Network is unreachable")

    with pytest.raises(d.VendorError, match="cannot be downloaded .*unreachable"):
        d.vendor_html_dir(html_dir, tmp_path / "c2", substitutes={}, get=unreachable)


def test_integrity_uses_the_strongest_algorithm():
    data = b"abc"
    s256, s384, s512 = (d.integrity_of(data, a) for a in ("sha256", "sha384", "sha512"))
    assert d.matches_integrity(data, s384)
    assert d.matches_integrity(data, f"{s256} {s384}")
    assert d.matches_integrity(data, "sha384-wrong " + s384)  # one of the strongest suffices
    assert not d.matches_integrity(data, f"{s256} sha512-wrong")  # a weaker one does not count
    assert d.matches_integrity(data, s512)
    with pytest.raises(d.VendorError):
        d.matches_integrity(data, "md5-abc")


def test_cdn_rules():
    assert d.npm_source(JQUERY, {}) == (d.Source("jquery", "3.3.1", "dist/jquery.min.js"), None)
    assert d.npm_source("https://cdn.jsdelivr.net/npm/@scope/pkg@2.0.0/a/b.js", {})[0] == \
        d.Source("@scope/pkg", "2.0.0", "a/b.js")
    assert d.npm_source(MD5, {})[0] == FILES[MD5][0]
    for bad in ("https://cdn.example.com/x.js",
                "https://cdnjs.cloudflare.com/ajax/libs/x/1.0/../../etc/passwd"):
        with pytest.raises(d.VendorError):
            d.npm_source(bad, {})


def test_every_cdn_url_of_the_installed_asv_has_a_source():
    asv = pytest.importorskip("asv")
    template = Path(asv.__file__).parent / "www" / "index.html"
    tags = d.external_tags(template.read_text(encoding="utf-8"))
    assert tags, "asv's index.html no longer loads anything from a CDN?"
    for tag in tags:
        source, pinned = d.npm_source(tag.url)
        assert pinned is not None or dict(tag.attrs).get("integrity"), tag.url
