"""Data Docs' assets: every CDN URL GX's templates use is pinned, fetched and checksummed."""

from __future__ import annotations

import re
from pathlib import Path

from validation import data_docs


def _template_urls() -> set[str]:
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    found: set[str] = set()
    for template in templates.glob("*.j2"):
        found |= set(re.findall(r'(?:src|href)="(https://[^"]+)"', template.read_text()))
    return {u for u in found if not re.search(r"greatexpectations\.io|\{\{", u)}


def test_every_cdn_url_of_the_installed_gx_is_pinned():
    """A GX upgrade that adds or moves a CDN asset fails here, not in a user's browser."""
    pinned = {a.url for a in data_docs.assets() if a.url}
    assert _template_urls() <= pinned, sorted(_template_urls() - pinned)


def test_the_cache_holds_every_asset_with_its_pinned_hash():
    """scripts/setup.sh fetched them; a tampered or partial cache is reported, not used."""
    assert data_docs.missing(data_docs.default_cache()) == []


def test_localize_rewrites_pages_at_any_depth_and_refuses_a_tampered_cache(tmp_path):
    site = tmp_path / "site"
    page = site / "validations" / "suite" / "run" / "page.html"
    page.parent.mkdir(parents=True)
    jquery = "https://code.jquery.com/jquery-3.7.1.min.js"
    logo = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1"
    page.write_text(f'<script src="{jquery}"></script><img src="{logo}">')
    assert data_docs.localize(site) == 1
    html = page.read_text()
    assert 'src="../../../static/vendor/jquery@3.7.1/dist/jquery.min.js"' in html
    assert 'src="../../../static/images/logo-long.png"' in html
    assert (site / "static/vendor/jquery@3.7.1/dist/jquery.min.js").is_file()
    assert data_docs.localize(site) == 0  # idempotent

    # a cache whose file differs from the pinned hash is not copied into any site
    cache = tmp_path / "cache"
    for a in data_docs.assets():
        (cache / a.local).parent.mkdir(parents=True, exist_ok=True)
        (cache / a.local).write_bytes((data_docs.default_cache() / a.local).read_bytes())
    tampered = data_docs.assets()[0]
    (cache / tampered.local).write_text("alert('x')")
    assert data_docs.missing(cache) == [tampered]
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text(f'<script src="{jquery}"></script>')
    assert data_docs.localize(other, cache) == 0  # left as GX built it, with a warning
    assert jquery in (other / "index.html").read_text()
    assert not (other / "static").exists()
