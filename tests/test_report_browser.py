"""report.html as a reader sees it: opened in headless Chromium, every plot decodes, every table renders, no error.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``; the driver
is ``/usr/bin/chromedriver``, the same version as the browser, so nothing is downloaded) and ``selenium`` (in
the ``dev`` extra). Without them the test is skipped and says which is missing; with
``ARENA_REQUIRE_BROWSER=1`` (set by ``.ci/run``) it fails instead, so a missing install step cannot pass CI.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_report import bench_record, train_record

from harness.report import build_report
from harness.store import now_iso, write_record

BROWSERS = ("chromium", "chromium-browser")  # Debian's name, then Ubuntu's
DRIVER = "chromedriver"
PAGE_LOAD_S = 60

# Every <img> waits for its decode (rejected when the data is not a valid image); every table says whether it
# is laid out on the page and how many body rows it has.
INSPECT_JS = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
Promise.allSettled(imgs.map(img => img.decode())).then(results => done({
  images: imgs.map((img, i) => ({alt: img.alt, src: img.src, decoded: results[i].status === "fulfilled",
                                 naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight})),
  tables: Array.from(document.querySelectorAll("table")).map(t => {
    const box = t.getBoundingClientRect(), style = getComputedStyle(t);
    return {rows: t.tBodies.length ? t.tBodies[0].rows.length : 0, width: box.width, height: box.height,
            shown: style.display !== "none" && style.visibility === "visible", text: t.innerText.slice(0, 80)};
  }),
}));
"""


def _unavailable(reason: str) -> None:
    """Skip, or fail where the environment says the browser must be there (CI)."""
    if os.environ.get("ARENA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (ARENA_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the system chromedriver (never Selenium Manager, which would download one)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("browser test: selenium is not installed (pip install -e '.[dev]')")
    binary = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver_path = shutil.which(DRIVER)
    if binary is None or driver_path is None:
        _unavailable(f"browser test: no {'chromium' if binary is None else DRIVER} on PATH "
                     "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1280,1024"):
        options.add_argument(flag)
    if os.geteuid() == 0:  # Chromium refuses to start as root inside its sandbox
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(PAGE_LOAD_S)
    driver.set_script_timeout(PAGE_LOAD_S)
    yield driver
    driver.quit()


def _write_store(root: Path) -> None:
    """A small store that draws every kind of plot: ListOps and two MQAR rungs with two seeds each, two
    benchmarked mechanisms, an approximation sweep."""
    records = []
    for seed in (0, 1):
        records += [train_record("full", "listops", seed, acc=0.36 + 0.02 * seed),
                    train_record("performer", "listops", seed, acc=0.30 + 0.01 * seed, speed=200.0, mem=5e7)]
        for attention, acc in (("full", 0.95), ("performer", 0.50)):
            for pairs in (4, 8):
                record = train_record(attention, "mqar", seed, acc=acc - 0.01 * pairs + 0.01 * seed)
                record["record_id"] += f".k{pairs}"
                record["majority_test_acc"] = 0.02
                record["config"]["task"]["params"] = {"form": "encoder", "seq_len": 64, "num_kv_pairs": pairs}
                record["attention_config"] = {"num_heads": 4, "head_dim": 16, "max_seq_len": 64,
                                              **({"num_features": 64} if attention == "performer" else {})}
                records.append(record)
    for pass_ in ("fwd", "fwd+bwd"):
        for n in (1024, 2048, 4096):
            records += [bench_record("full", pass_, n, t=1e-9 * n**2, mem=4.0 * n**2),
                        bench_record("performer", pass_, n, t=4e-6 * n, mem=1000.0 * n)]
    for value in (16, 64, 256):
        records.append({
            "kind": "approx", "record_id": f"performer.num_features={value}.iid", "status": "ok",
            "created_at": now_iso(), "mechanism": "performer", "param": "num_features", "value": value,
            "variant": "iid", "error_mean": value**-0.5, "error_std": 0.01, "errors": [value**-0.5],
            "inputs": "iid inputs",
        })
    for record in records:
        write_record(record, root)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("browser") / "results"
    _write_store(root)
    return build_report(root, root / "report", slope_range=(1024, 4096))


def _embedded_file(data_uri: str, pngs: list[Path]) -> Path:
    """The written PNG that a ``data:image/png;base64,...`` URI carries, byte for byte (AssertionError if none)."""
    head, _, data = data_uri.partition(",")
    assert head == "data:image/png;base64", f"not an embedded PNG: {head[:60]!r}"
    try:
        payload = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise AssertionError(f"image data is not valid base64: {exc}") from None
    match = [path for path in pngs if path.read_bytes() == payload]
    assert match, "image data is not any of the PNGs the report wrote (corrupted on the way)"
    return match[0]


def test_report_html_renders_in_chromium(browser, report):
    page = report["out"] / "report.html"
    browser.get_log("browser")  # start from an empty console
    browser.get(page.as_uri())
    found = browser.execute_async_script(INSPECT_JS)

    pngs = [path for path in report["files"] if path.suffix == ".png"]
    assert len(pngs) >= 6, f"the fixture should draw most plots, drew {[p.name for p in pngs]}"
    embedded = []
    for img in found["images"]:
        assert img["decoded"] and img["naturalWidth"] > 0, f"image {img['alt']!r} does not decode in the browser"
        path = _embedded_file(img["src"], pngs)
        with Image.open(path) as png:
            assert (img["naturalWidth"], img["naturalHeight"]) == png.size, f"{path.name} shown at another size"
        embedded.append(path.name)
    assert sorted(embedded) == sorted(p.name for p in pngs), "every plot written is embedded in the page, once"

    source = page.read_text(encoding="utf-8")
    assert found["tables"] and len(found["tables"]) == len(re.findall(r"<table\b", source)), \
        "every table in the markup is parsed as one table"
    for table in found["tables"]:
        assert table["rows"] > 0, f"table without rows: {table['text']!r}"
        assert table["shown"] and table["width"] > 0 and table["height"] > 0, f"table not shown: {table['text']!r}"

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
