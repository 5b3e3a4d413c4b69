"""Data Docs that render without internet: the site's CDN assets served from the site itself.

Great Expectations' page templates load Bootstrap, jQuery, bootstrap-table, Font Awesome and
Vega from public CDNs and its logo from S3, and it has no setting to change that. On a machine
without internet the index then lists nothing (its table is built by bootstrap-table) and the
validation pages lose their styling and pass/fail icons. So after every site build we rewrite
the HTML to local copies under ``static/vendor/`` of the site.

The copies come from the npm distributions of those libraries (the npm registry is reachable
where the CDNs may not be; ``NPM_CONFIG_REGISTRY`` names a mirror), pinned by version and by
the sha256 of every file in ``data_docs_assets.tsv``; for the two scripts GX loads with a
subresource-integrity hash, the npm files match it byte for byte, so the browser's own check
passes too. ``fetch`` runs at
install time (``scripts/setup.sh``, the image's build) into a cache outside the clone, like
helm (``scripts/fetch_tools.sh``); at run time nothing is downloaded. Standard library only,
so the image's builder runs this file before anything is installed.

    python -m validation.data_docs fetch      # into SHOPML_DOCS_ASSETS (default ~/.cache/...)
    python -m validation.data_docs localize SITE_DIR
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("data_docs_assets.tsv")
VENDOR = Path("static") / "vendor"
# GX's navbar logo: ``<S3 prefix><name>?d=<context id>``; GX ships the same images in the site.
_S3_IMAGES = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/([\w.-]+)(\?[^\"']*)?"
)


@dataclass(frozen=True)
class Asset:
    url: str | None  # as GX's templates write it; None for a file another asset loads (fonts)
    package: str
    version: str
    file: str
    sha256: str

    @property
    def local(self) -> Path:
        """Where it lives, relative to the cache and to the site's ``static/vendor``."""
        return Path(f"{self.package}@{self.version}") / self.file


def assets() -> list[Asset]:
    rows = [line.split("\t") for line in TABLE.read_text().splitlines() if line[:1] not in "#"]
    return [Asset(None if r[0] == "-" else r[0], *r[1:]) for r in rows if len(r) == 5]


def default_cache() -> Path:
    """``SHOPML_DOCS_ASSETS``, else the user's cache (shared by every clone and CI run)."""
    if env := os.environ.get("SHOPML_DOCS_ASSETS"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "shopml" / "docs-assets"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def missing(cache: Path) -> list[Asset]:
    """Assets absent from ``cache`` or whose bytes differ from the pinned hash."""
    return [a for a in assets() if not (cache / a.local).is_file()
            or _sha256(cache / a.local) != a.sha256]  # fmt: skip


def tarball_url(package: str, version: str) -> str:
    """The registry's address of a package version's tarball (scoped names keep their scope)."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    return f"{registry}/{package}/-/{package.split('/')[-1]}-{version}.tgz"


def fetch(cache: Path | None = None) -> Path:
    """Download the pinned npm tarballs that hold missing assets, keep the listed files and
    check each one's sha256 against the table (a changed file is refused, not used)."""
    cache = cache or default_cache()
    todo = missing(cache)
    for package, version in sorted({(a.package, a.version) for a in todo}):
        with tempfile.TemporaryDirectory() as tmp:
            url = tarball_url(package, version)
            log.info("fetching %s", url)
            tarball = Path(tmp) / "package.tgz"
            with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (https)
                tarball.write_bytes(response.read())
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            for a in todo:
                if (a.package, a.version) != (package, version):
                    continue
                src = Path(tmp) / "package" / a.file
                if _sha256(src) != a.sha256:
                    raise RuntimeError(
                        f"{package}@{version}/{a.file}: sha256 {_sha256(src)} does not match "
                        f"the pinned {a.sha256} in {TABLE.name}; refusing to use it"
                    )
                (cache / a.local).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, cache / a.local)
    return cache


def localize(site: Path, cache: Path | None = None) -> int:
    """Copy the assets into ``site/static/vendor`` and point every HTML page at them.

    Idempotent (a rewritten page has no CDN URL left). Returns the number of pages changed.
    Without the assets in the cache the site is left as GX built it, with a warning naming the
    command that fetches them: Data Docs are a view, not a reason to fail a pipeline.
    """
    cache = cache or default_cache()
    if gone := missing(cache):
        log.warning(
            "Data Docs keep their CDN links (%d assets missing from %s, e.g. %s): run "
            "`python -m validation.data_docs fetch` (scripts/setup.sh does)",
            len(gone), cache, gone[0].local,
        )  # fmt: skip
        return 0
    vendor = site / VENDOR
    listed = assets()
    for a in listed:
        dst = vendor / a.local
        if not dst.is_file() or _sha256(dst) != a.sha256:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache / a.local, dst)
    urls = {a.url: vendor / a.local for a in listed if a.url}
    changed = 0
    for page in site.rglob("*.html"):
        text = page.read_text()
        new = text
        for url, target in urls.items():
            if url in new:
                new = new.replace(f'"{url}"', f'"{os.path.relpath(target, page.parent)}"')
        images = os.path.relpath(site / "static" / "images", page.parent)
        new = _S3_IMAGES.sub(lambda m, images=images: f"{images}/{m.group(1)}", new)
        if new != text:
            page.write_text(new)
            changed += 1
    return changed


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="data_docs: %(message)s")
    if argv[:1] == ["fetch"]:
        print(fetch(Path(argv[1]) if len(argv) > 1 else None))
        return 0
    if argv[:1] == ["localize"] and len(argv) == 2:
        print(f"{localize(Path(argv[1]))} pages rewritten")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
