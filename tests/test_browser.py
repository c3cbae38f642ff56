"""The report as a reader sees it: rendered by headless Chromium at 800 and 1400 px.

Each page of a small run's report (the index and every page it links to) is opened in a copy that
carries a probe script; the probe records script errors, images that did not load and any table
that reaches past the window without a scroller, and Chromium prints the page (``--dump-dom``) with
the probe's findings. Links are checked on disk. Skipped, with the reason, where no Chromium is
installed (``.ci/run`` installs Debian's ``chromium``)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "reports" / "smoke-default"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (Debian: apt install chromium); "
                                                        "the report's browser test needs one")

PROBE = """<script>
window.__probe = {errors: []};
window.addEventListener("error", function (e) {
  window.__probe.errors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
}, true);
window.addEventListener("load", function () {
  var out = {errors: window.__probe.errors, cut: [], broken: [], width: document.documentElement.clientWidth,
             page_overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
             tables: document.querySelectorAll("table").length, images: document.images.length};
  document.querySelectorAll("table").forEach(function (t) {
    var box = t.parentElement, style = getComputedStyle(box);
    var scrolls = style.overflowX === "auto" || style.overflowX === "scroll";
    var right = t.getBoundingClientRect().right;
    if (right > out.width + 1 && !scrolls) out.cut.push(t.rows[0].textContent.slice(0, 60));
    if (scrolls && box.getBoundingClientRect().right > out.width + 1) out.cut.push("scroller past the window");
  });
  Array.prototype.forEach.call(document.images, function (img) {
    if (!img.complete || img.naturalWidth === 0) out.broken.push(img.getAttribute("src"));
  });
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])


def _parse(page: Path) -> Links:
    p = Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def _render(page: Path, width: int, tmp: Path) -> dict:
    """The probe's findings for ``page`` in a window ``width`` px wide."""
    text = page.read_text(encoding="utf-8").replace(' loading="lazy"', "")  # every image loads, seen or not
    probe = page.with_name(f".probe-{width}-{page.name}")
    probe.write_text(text.replace("</title>", "</title>" + PROBE, 1), encoding="utf-8")
    try:
        out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp / 'profile'}", f"--window-size={width},1000",
                              "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', out.stdout, re.S)
    assert found, f"{page.name} at {width} px: the page did not finish loading\n{out.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The published default run's records, its report rebuilt by this code."""
    from benchmark.reports import write_report

    run = tmp_path_factory.mktemp("browser") / "run"
    shutil.copytree(PUBLISHED, run, ignore=shutil.ignore_patterns("report", "tables"))
    figures = PUBLISHED / "report" / "figures"
    if (figures / "umap_restored.png").is_file():  # made at run time from the models (not published): kept
        (run / "report" / "figures").mkdir(parents=True)
        shutil.copy(figures / "umap_restored.png", run / "report" / "figures")
    assert write_report(run)
    return run


def test_every_page_of_the_report_reads_right_at_800_and_1400_px(report, tmp_path):
    index = report / "report" / "index.html"
    pages, seen, missing = [index], set(), []
    while pages:  # the index and every page it links to, links checked on disk
        page = pages.pop()
        if page in seen:
            continue
        seen.add(page)
        parsed = _parse(page)
        for href in parsed.links + parsed.images:
            parts = urlsplit(href)
            if parts.scheme in ("http", "https", "mailto"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.is_file():
                missing.append(f"{page.relative_to(report)}: {href}")
                continue
            if parts.fragment and target.suffix == ".html" and parts.fragment not in _parse(target).ids:
                missing.append(f"{page.relative_to(report)}: {href} (no such anchor)")
            if target.suffix == ".html" and page == index:
                pages.append(target)
    assert not missing, "links or images that do not resolve:\n" + "\n".join(missing)
    assert {p.name for p in seen} >= {"index.html", "checks.html", "draws.html", "results.html"}, sorted(seen)
    for page in sorted(seen):
        for width in (800, 1400):
            found = _render(page, width, tmp_path)
            where = f"{page.relative_to(report)} at {width} px"
            assert found["width"] <= width and found["errors"] == [], (where, found)
            assert found["broken"] == [], (where, found)
            assert found["cut"] == [] and found["page_overflow"] <= 0, (where, found)
    first = _render(index, 800, tmp_path)
    assert first["tables"] >= 5 and first["images"] >= 3, first


def test_wide_tables_scroll_and_the_navigation_stays_one_line(report):
    text = (report / "report" / "index.html").read_text(encoding="utf-8")
    assert text.count('<div class="wide"><table>') == text.count("<table>") > 0
    nav = re.search(r"<nav>(.*?)</nav>", text, re.S).group(1)
    labels = re.findall(r">([^<]+)</a>", nav)
    assert labels and all(len(label) <= 16 for label in labels), labels
    assert "How to read this" in text and 'href="#definitions"' in text
