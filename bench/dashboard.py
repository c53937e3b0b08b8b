"""The asv dashboard, published so that it works without internet (issue 10).

    python -m bench.dashboard               # asv publish, then vendor the CDN scripts
    python -m bench.dashboard --no-publish  # only vendor an html dir asv already wrote
    python -m bench.dashboard --offline     # use the download cache only, no network
    python -m http.server -d .asv/html      # then open http://127.0.0.1:8000

``asv publish`` writes an ``index.html`` that loads jQuery, flot, bootstrap,
stupidtable and blueimp-md5 from public CDNs; without them the page redirects
to ``error.html``.  This module replaces each CDN ``<script src>`` and
``<link href>`` by a copy under ``<html dir>/vendor/NAME@VERSION/PATH``, taken
from the npm registry's tarball of that package and version, and keeps the
tag's ``integrity`` hash, which the file must match (else it stops with an
error and leaves the HTML as it was).  No third-party file is kept in the
repository: downloads are cached per file under ``.asv/vendor-cache/npm/``
(git-ignored), and later runs need no network at all.

Where a CDN's file is published on no registry byte for byte, ``SUBSTITUTES``
names the registry file served instead and pins its sha384; the tag then gets
that hash, so every vendored file is checked against a known hash.

This module is imported by asv's benchmark discovery (it lives in bench/):
it defines no benchmark names and does nothing at import time.
"""

import argparse
import base64
import hashlib
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
ASV_CONF = ROOT / "asv.conf.json"
DEFAULT_CACHE = ROOT / ".asv" / "vendor-cache"
VENDOR_DIR = "vendor"
NPM_REGISTRY = "https://registry.npmjs.org"
DOWNLOAD_TIMEOUT_S = 60


class VendorError(RuntimeError):
    """A CDN file that cannot be vendored; the message is one line."""


class Source(NamedTuple):
    """One file of one npm package version: what is fetched for a CDN URL."""

    package: str
    version: str
    path: str  # inside the package, without the tarball's top folder

    def __str__(self):
        return f"{self.package}@{self.version}/{self.path}"


class Substitute(NamedTuple):
    """A registry file served in place of a CDN file no registry publishes."""

    source: Source
    sha384: str  # "sha384-<base64>" of ``source``, pinned here


# CDN URL -> npm source, read in order; groups fill the templates.
CDN_RULES = (
    # jsDelivr's /npm/ serves npm tarballs' files byte for byte.
    (
        re.compile(
            r"https://cdn\.jsdelivr\.net/npm/"
            r"(?P<package>(?:@[\w.-]+/)?[\w.-]+)@(?P<version>[\w.+-]+)/(?P<path>[^?#]+)"
        ),
        "{package}",
        "{path}",
    ),
    # code.jquery.com's release files are the ones in jquery's npm dist/.
    (
        re.compile(
            r"https://code\.jquery\.com/jquery-(?P<version>\d+\.\d+\.\d+)"
            r"(?P<variant>(?:\.slim)?(?:\.min)?)\.js"
        ),
        "jquery",
        "dist/jquery{variant}.js",
    ),
    # cdnjs: most libraries under their npm names, files at the same paths.
    (
        re.compile(
            r"https://cdnjs\.cloudflare\.com/ajax/libs/"
            r"(?P<package>[\w.-]+)/(?P<version>[\w.+-]+)/(?P<path>[^?#]+)"
        ),
        "{package}",
        "{path}",
    ),
)

# cdnjs minified flot 0.8.3 itself (npm's flot@0.8.3 has only the sources), and
# stupidtable 1.0.1 is on no registry; asv 0.6.6 references both.  The sources of
# the same flot version, and stupid-table-plugin 1.1.3 (the only npm release;
# same API: stupidtable(), stupidsort(), aftertablesort) are served instead.
_FLOT = "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/"
SUBSTITUTES = {
    _FLOT + "jquery.flot.min.js": Substitute(
        Source("flot", "0.8.3", "jquery.flot.js"),
        "sha384-BEasWKcYLxJSe7Dd+oFIyT92mMKekrrit2ilFCODDydHzd4eReLNz3UYG/TF1b0v",
    ),
    _FLOT + "jquery.flot.time.min.js": Substitute(
        Source("flot", "0.8.3", "jquery.flot.time.js"),
        "sha384-KIXIWdEuZIzipZRAGOzqfrwF/z4Euro30f4MWlFxD6A39o51qSaMOGD84i20SMlW",
    ),
    _FLOT + "jquery.flot.selection.min.js": Substitute(
        Source("flot", "0.8.3", "jquery.flot.selection.js"),
        "sha384-EWb1fTmbkoRXdUSIBGPoXwWsjIrntLRianrZEsrLMLtJcmQ4SyIkY19Ic42ISGKH",
    ),
    _FLOT + "jquery.flot.categories.min.js": Substitute(
        Source("flot", "0.8.3", "jquery.flot.categories.js"),
        "sha384-yzh2w0jzVQMN+zU78Sn6vQ6Sjlv47t1/SJlLOYTC/BnpfzvDHkVyPmZbL7RD17aA",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": Substitute(
        Source("stupid-table-plugin", "1.1.3", "stupidtable.min.js"),
        "sha384-gGnTJbRKCn6K3iFprK1XL3RoTiYOV5813ZTfrjLPYyF3aCoz8DGPdrwY3Fy3PLNO",
    ),
}

# <link rel=...> values that load a resource (not "alternate", "canonical", ...).
LOADING_RELS = {"stylesheet", "icon", "preload", "modulepreload"}

_NPM_NAME = re.compile(r"(?:@[a-z0-9][\w.-]*/)?[a-z0-9][\w.-]*")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- URLs, hashes


def npm_source(url, substitutes=SUBSTITUTES):
    """The npm file for a CDN URL and the hash it must have (None: the tag's own)."""
    if url in substitutes:
        sub = substitutes[url]
        return sub.source, sub.sha384
    for pattern, package, path in CDN_RULES:
        m = pattern.fullmatch(url)
        if m:
            groups = m.groupdict()
            source = Source(package.format(**groups), groups["version"], path.format(**groups))
            return _checked(source, url), None
    raise VendorError(f"no registry source known for {url} (add a rule to CDN_RULES)")


def _checked(source, url):
    parts = source.path.split("/")
    if not _NPM_NAME.fullmatch(source.package) or ".." in parts or "" in parts:
        raise VendorError(f"refusing odd package or path {source} from {url}")
    return source


def integrity_of(data, algorithm="sha384"):
    """The Subresource Integrity value of ``data``: "sha384-<base64>"."""
    digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm}-{base64.b64encode(digest).decode()}"


def matches_integrity(data, integrity):
    """True when ``data`` matches an SRI attribute value, as a browser checks it.

    The value may list several hashes; only those of the strongest algorithm
    count, and one match is enough.
    """
    hashes = {}
    for token in integrity.split():
        algorithm, _, rest = token.partition("-")
        if algorithm in ("sha256", "sha384", "sha512"):
            hashes.setdefault(algorithm, []).append(rest.split("?")[0])
    if not hashes:
        raise VendorError(f"no sha256/384/512 hash in integrity={integrity!r}")
    strongest = max(hashes, key=lambda a: int(a[3:]))
    return integrity_of(data, strongest).partition("-")[2] in hashes[strongest]


# ---------------------------------------------------------------- cache, download


def tarball_url(package, version, registry=None):
    registry = (registry or os.environ.get("NPM_CONFIG_REGISTRY")
                or os.environ.get("npm_config_registry") or NPM_REGISTRY)
    return f"{registry.rstrip('/')}/{package}/-/{package.split('/')[-1]}-{version}.tgz"


def http_get(url):
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def cached_path(cache_dir, source):
    return Path(cache_dir) / "npm" / f"{source.package}@{source.version}" / source.path


def fetch(sources, cache_dir, offline=False, get: Callable[[str], bytes] = http_get):
    """{source: bytes} for npm files, from the cache or else one tarball per package.

    Downloaded files are written to the cache; nothing is downloaded when
    ``offline``.  Raises VendorError (one line) for a file neither cached nor
    downloadable.
    """
    found, missing = {}, {}
    for source in sources:
        path = cached_path(cache_dir, source)
        if path.is_file():
            found[source] = path.read_bytes()
        else:
            missing.setdefault((source.package, source.version), []).append(source)
    for (package, version), wanted in missing.items():
        if offline:
            raise VendorError(
                f"{wanted[0]} is not in the cache {cached_path(cache_dir, wanted[0])} "
                "and --offline forbids downloading it")
        url = tarball_url(package, version)
        try:
            tgz = get(url)
        except (urllib.error.URLError, OSError) as exc:
            raise VendorError(f"{wanted[0]} is not cached and {url} cannot be downloaded "
                              f"({getattr(exc, 'reason', exc)})") from exc
        files = _members(tgz, {s.path for s in wanted}, url)
        for source in wanted:
            path = cached_path(cache_dir, source)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(files[source.path])
            tmp.replace(path)
            found[source] = files[source.path]
    return found


def _members(tgz, paths, url):
    """The files ``paths`` of an npm tarball (whose top folder is dropped)."""
    files = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            for member in tar:
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and inner in paths:
                    files[inner] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise VendorError(f"{url} is not a readable tarball ({exc})") from exc
    missing = sorted(paths - files.keys())
    if missing:
        raise VendorError(f"{url} has no file {missing[0]}")
    return files


# ---------------------------------------------------------------- HTML


class Tag(NamedTuple):
    text: str  # the start tag exactly as written in the file
    name: str  # "script" or "link"
    attrs: list  # [(name, value or None)], in order
    url_attr: str  # "src" or "href"
    url: str


class _TagFinder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []

    def handle_starttag(self, name, attrs):
        values = dict(attrs)
        if name == "script":
            url_attr = "src"
        elif name == "link" and LOADING_RELS & set((values.get("rel") or "").lower().split()):
            url_attr = "href"
        else:
            return
        url = values.get(url_attr) or ""
        if url.startswith(("https://", "http://", "//")):
            self.tags.append(Tag(self.get_starttag_text(), name, attrs, url_attr, url))

    handle_startendtag = handle_starttag


def external_tags(text):
    """The <script src> and resource <link href> tags of an HTML text that load from other hosts."""
    finder = _TagFinder()
    finder.feed(text)
    finder.close()
    return finder.tags


def _start_tag(name, attrs):
    parts = [name] + [a if v is None else f'{a}="{html.escape(v, quote=True)}"' for a, v in attrs]
    return "<" + " ".join(parts) + ">"


def _rewritten(tag, local_url, integrity):
    attrs = []
    for attr, value in tag.attrs:
        if attr == tag.url_attr:
            value = local_url
        elif attr == "integrity" and integrity is not None:
            value = integrity
        attrs.append((attr, value))
    attrs.append(("data-vendored-from", tag.url))
    return _start_tag(tag.name, attrs)


# ---------------------------------------------------------------- vendoring


class Vendored(NamedTuple):
    url: str  # the CDN URL it replaced
    local: Path  # the copy under the html dir
    substitute: bool  # True: a pinned registry file, not the CDN's bytes


def vendor_html_dir(html_dir, cache_dir=DEFAULT_CACHE, offline=False,
                    substitutes=SUBSTITUTES, get=http_get):
    """Copy every CDN file that the html dir's pages load into ``html_dir/vendor``.

    Rewrites the tags of each top-level ``*.html`` to relative paths; a tag's
    integrity is kept and checked (a substitute's pinned sha384 replaces it).
    Nothing is rewritten unless every file is found and verified: VendorError
    otherwise.  Returns what was vendored (empty when nothing loads from a CDN).
    """
    html_dir = Path(html_dir)
    pages = sorted(html_dir.glob("*.html"))
    if not (html_dir / "index.html").is_file():
        raise VendorError(f"{html_dir} has no index.html: run asv publish first")
    texts = {page: page.read_text(encoding="utf-8") for page in pages}
    tags = {page: external_tags(text) for page, text in texts.items()}

    plan = {}  # url -> (source, pinned sha384 or None)
    for page_tags in tags.values():
        for tag in page_tags:
            plan.setdefault(tag.url, npm_source(tag.url, substitutes))
    contents = fetch({source for source, _ in plan.values()}, cache_dir, offline, get)

    copies = {}  # url -> (Vendored, integrity to write or None to keep)
    for page, page_tags in tags.items():
        for tag in page_tags:
            source, pinned = plan[tag.url]
            data = contents[source]
            expected = pinned or dict(tag.attrs).get("integrity")
            if expected is None:
                raise VendorError(f"{page.name}: {tag.url} has no integrity hash to check {source} against")
            if not matches_integrity(data, expected):
                raise VendorError(
                    f"{source} (cached at {cached_path(cache_dir, source)}) does not match "
                    f"{expected} for {tag.url}; delete that file to download it again")
            local = html_dir / VENDOR_DIR / f"{source.package}@{source.version}" / source.path
            copies[tag.url] = (Vendored(tag.url, local, pinned is not None), pinned)

    for url, (done, _) in copies.items():
        done.local.parent.mkdir(parents=True, exist_ok=True)
        done.local.write_bytes(contents[plan[url][0]])
    for page, page_tags in tags.items():
        text = texts[page]
        for tag in page_tags:
            done, pinned = copies[tag.url]
            local_url = Path(os.path.relpath(done.local, page.parent)).as_posix()
            text = text.replace(tag.text, _rewritten(tag, local_url, pinned))
        if page_tags:
            page.write_text(text, encoding="utf-8")
    return [done for done, _ in copies.values()]


# ---------------------------------------------------------------- command line


def html_dir_from_conf(conf=ASV_CONF):
    """``html_dir`` of asv.conf.json (JSON with // comments), relative to its folder."""
    from asv.util import load_json  # asv is in the "test" extra

    conf = Path(conf)
    return conf.parent / load_json(str(conf), js_comments=True).get("html_dir", "html")


def publish(html_dir, conf=ASV_CONF):
    """Run ``asv publish`` into ``html_dir`` (asv deletes and rewrites that folder)."""
    cmd = [sys.executable, "-m", "asv", "publish", "--config", str(conf), "--html-dir", str(html_dir)]
    log("$ " + " ".join(cmd))
    if subprocess.run(cmd, cwd=Path(conf).parent).returncode != 0:
        raise VendorError("asv publish failed (see its output above)")


def publish_vendored(html_dir, conf=ASV_CONF, cache_dir=DEFAULT_CACHE, offline=False):
    """``asv publish`` and vendoring into a staging folder that replaces ``html_dir``
    only when both succeeded, so a failure leaves the previous dashboard as it was."""
    html_dir = Path(html_dir)
    staging = html_dir.with_name(html_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        publish(staging, conf)
        done = vendor_html_dir(staging, cache_dir, offline=offline)
        shutil.rmtree(html_dir, ignore_errors=True)
        staging.rename(html_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [v._replace(local=html_dir / v.local.relative_to(staging)) for v in done]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html-dir", type=Path, default=None,
                        help="dashboard folder (default: html_dir of asv.conf.json)")
    parser.add_argument("--config", type=Path, default=ASV_CONF, help="asv config file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"download cache (default: {DEFAULT_CACHE.relative_to(ROOT)})")
    parser.add_argument("--no-publish", action="store_true",
                        help="do not run asv publish; only vendor an existing html dir")
    parser.add_argument("--offline", action="store_true",
                        help="use the download cache only; never touch the network")
    args = parser.parse_args(argv)
    try:
        html_dir = args.html_dir if args.html_dir is not None else html_dir_from_conf(args.config)
        html_dir = Path(html_dir).resolve()
        if args.no_publish:
            done = vendor_html_dir(html_dir, args.cache_dir, offline=args.offline)
        else:
            done = publish_vendored(html_dir, args.config, args.cache_dir, args.offline)
    except VendorError as exc:
        print(f"bench.dashboard: error: {exc}", file=sys.stderr)
        return 1
    if done:
        substitutes = sum(v.substitute for v in done)
        log(f"vendored {len(done)} files into {html_dir / VENDOR_DIR} ({len(done) - substitutes} "
            f"identical to the CDN's, {substitutes} pinned substitutes)")
    else:
        log(f"no page in {html_dir} loads anything from a CDN (already vendored)")
    log(f"serve with: python -m http.server -b 127.0.0.1 -d {html_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
