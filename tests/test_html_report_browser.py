"""The HTML report in a real browser: Debian's chromium, headless, driven over the Chrome
DevTools Protocol (CDP).

The report is built from a real build of the bundled iSAID val images (prepare, plan, the
three annotate passes with the template backend, compose with `max_phrases` lowered so that
some tiles are dropped; the last record's first phrase renamed "boats", a category claim its
masks contradict), then opened from disk (file://). The tests check that the expected tiles,
phrases and images render, records with failed claims first, that the category filter hides
the other tiles and that paging keeps it, that the claims filter shows only records with
failed claims and lists each under its caption, that the summary and drop pages show their
figures, and that no page logs an error. A screenshot of the first page is saved to the test's
tmp folder.

CDP speaks JSON over a websocket; `DevTools` below is a minimal RFC 6455 client on the
standard library (no websocket package is installed). Chromium missing is a FAILURE, not a
skip: CI installs it (set GEOPIXELD_CHROMIUM to use another binary).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipeline.core.params import Params
from pipeline.core.shards import list_shards, read_records, write_records
from pipeline.formats.html_report import PALETTE
from pipeline.stages.annotate import run_annotate
from pipeline.stages.compose.stage import run_compose
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare
from pipeline.stages.qa import run_qa
from schemas import DroppedRecord, GroundedRecord

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars", "--window-size=1280,1000", "--remote-debugging-port=0"]
TILES_PER_PAGE = 4
MAX_PHRASES = 5  # low enough that some val tiles are dropped (too_many_phrases)
TIMEOUT_S = 30.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def chromium_binary() -> str:
    """The browser to drive; a missing one fails the test with what to install."""
    candidates = [os.environ.get("GEOPIXELD_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("chromium not found at /usr/bin/chromium (apt-get install chromium, or set "
                "GEOPIXELD_CHROMIUM): the HTML report must be tested in a real browser")


# ---------------------------------------------------------------------------------------------
# A minimal websocket client, enough for CDP: text frames, fragmentation, ping, close.


class DevTools:
    """One CDP connection: `call(method, **params)` returns the result; events are kept."""

    def __init__(self, ws_url: str, timeout: float = TIMEOUT_S):
        url = urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket handshake")
            head += chunk
        head, _, self.buffer = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "101", f"websocket handshake refused: {lines[0]}"
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert headers.get("sec-websocket-accept") == accept, "bad Sec-WebSocket-Accept"
        self.next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self.sock.close()

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)  # a client must mask every frame (RFC 6455, 5.3)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
                  ).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def _message(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            parts.append(payload)
            if b0 & 0x80:
                return json.loads(b"".join(parts).decode())

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send(0x1, json.dumps({"id": self.next_id, "method": method,
                                    "params": params}).encode())
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {TIMEOUT_S} s")
            self.events.append(self._message())

    def evaluate(self, expression: str):
        """Value of a JS expression (a Promise is awaited); an exception fails the test."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def click_and_wait(self, selector: str) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far (then forgotten)."""
        self.call("Runtime.evaluate", expression="0")  # drain what already arrived
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        self.events = []
        return found


# ---------------------------------------------------------------------------------------------
# Fixtures: a real build, its report, one browser for the module


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("build")
    raw = Params().model_dump(mode="json")
    raw["data"].update(root=str(REPO / "data" / "isaid"), splits=["val"])
    raw["annotate"]["cache"]["path"] = str(out / "cache.sqlite")
    raw["compose"]["max_phrases"] = MAX_PHRASES
    raw["qa"]["tiles_per_page"] = TILES_PER_PAGE
    params = Params.model_validate(raw)
    run_prepare(params, out / "tiles", splits=["val"])
    run_plan(params, out / "tiles", out / "plan")
    for kind in ("holistic", "instance", "cluster"):
        run_annotate(params, kind, out / "tiles", out / "plan", out / "responses" / kind)
    run_compose(params, out / "tiles", out / "plan", out / "responses", out / "records")
    # the last record's first phrase becomes "boats": a category claim its masks contradict
    last_shard = list_shards(out / "records")[-1]
    kept = read_records(last_shard, GroundedRecord)
    *rest, last = kept
    old = last.phrases[0].text
    boats = last.model_copy(update={
        "caption": last.caption.replace(f"<p> {old} </p>", "<p> boats </p>", 1),
        "phrases": [last.phrases[0].model_copy(update={"text": "boats"}), *last.phrases[1:]]})
    write_records(last_shard, [*rest, boats], GroundedRecord)
    report = run_qa(params, out / "records", out / "metrics" / "qa.json", out / "plots",
                    out / "report", tiles_dir=out / "tiles", responses_dir=out / "responses")
    records = [r for p in list_shards(out / "records")
               for r in read_records(p, GroundedRecord)]
    drops = [d for p in list_shards(out / "records" / "dropped")
             for d in read_records(p, DroppedRecord)]
    assert len(records) > TILES_PER_PAGE, "the val build should fill more than one report page"
    assert drops, f"compose.max_phrases={MAX_PHRASES} should drop some val tiles"
    claims = pq.read_table(out / "report" / "claims.parquet").to_pylist()
    failing = {c["record_id"] for c in claims if c["verdict"] == "disagree"}
    assert boats.record_id in failing
    assert records[-1].record_id == boats.record_id and records[0].record_id not in failing
    ordered = sorted(records, key=lambda r: r.record_id not in failing)  # failed claims first
    pages = [ordered[i:i + TILES_PER_PAGE] for i in range(0, len(ordered), TILES_PER_PAGE)]
    assert report["pages"] == len(pages)
    return {"report": out / "report", "records": records, "drops": drops, "pages": pages,
            "failing": failing, "boats": boats, "claims": claims}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    devtools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited ({proc.returncode}): "
                            f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"chromium wrote no {port_file} within {TIMEOUT_S} s")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        conn.request("GET", "/json/list")
        targets = json.loads(conn.getresponse().read())
        conn.close()
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            devtools.call(f"{domain}.enable")
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _url(build: dict, name: str) -> str:
    return (build["report"] / name).resolve().as_uri()


VISIBLE_TILES = ("[...document.querySelectorAll('article.tile')]"
                 ".filter(a => !a.hidden && a.getBoundingClientRect().height > 0)"
                 ".map(a => a.dataset.tile)")


# ---------------------------------------------------------------------------------------------
# Tests


def test_pages_show_the_expected_tiles_phrases_and_images(build, browser, tmp_path):
    browser.errors()
    for i, expected in enumerate(build["pages"]):
        browser.open(_url(build, f"page-{i + 1:04d}.html"))
        tiles = browser.evaluate("[...document.querySelectorAll('article.tile')]"
                                 ".map(a => a.dataset.tile)")
        assert tiles == [r.tile_id for r in expected]
        phrases = browser.evaluate(
            "[...document.querySelectorAll('article.tile')].map(a => "
            "[...a.querySelectorAll('mark.phrase')].map(m => [m.textContent, "
            "getComputedStyle(m).borderBottomColor]))")
        assert phrases == [[[p.text, "rgb({}, {}, {})".format(*PALETTE[k % len(PALETTE)])]
                            for k, p in enumerate(r.phrases)] for r in expected]
        # every overlay image loads from disk and decodes (lazy ones included)
        sizes = browser.evaluate(
            "Promise.all([...document.querySelectorAll('article.tile img')].map(img => "
            "new Promise(ok => { const probe = new Image(); "
            "probe.onload = () => ok([probe.naturalWidth, probe.naturalHeight]); "
            "probe.onerror = () => ok([0, 0]); probe.src = img.src; })))")
        assert sizes == [[512, 512]] * len(expected)
    browser.open(_url(build, "page-0001.html"))
    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    path = tmp_path / "report-page-0001.png"
    path.write_bytes(shot)
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 50_000
    assert browser.errors() == []


def _category_to_filter(build: dict) -> str:
    """A category that some but not all tiles of the first page ground."""
    first = build["pages"][0]
    for category in sorted({p.category for r in build["records"] for p in r.phrases}):
        on_first = [any(p.category == category for p in r.phrases) for r in first]
        if any(on_first) and not all(on_first):
            return category
    pytest.fail("no category splits the first page's tiles; the test build changed")


def test_category_filter_hides_other_tiles_and_paging_keeps_it(build, browser):
    browser.errors()
    category = _category_to_filter(build)

    def expected(page: int) -> list[str]:
        return [r.tile_id for r in build["pages"][page]
                if any(p.category == category for p in r.phrases)]

    browser.open(_url(build, "page-0001.html"))
    assert browser.evaluate(VISIBLE_TILES) == [r.tile_id for r in build["pages"][0]]
    browser.evaluate(
        "new Promise(done => { window.addEventListener('hashchange', () => setTimeout(done, 0),"
        " {once: true}); const s = document.querySelector('#filters select[data-facet=category]');"
        f" s.value = String(QA_INDEX.facets.category.indexOf({json.dumps(category)}));"
        " s.dispatchEvent(new Event('change')); })")
    assert browser.evaluate(VISIBLE_TILES) == expected(0)
    assert browser.evaluate("location.hash") == f"#category={category}"
    status = browser.evaluate("document.getElementById('status').textContent")
    on_page = len(build["pages"][0])
    assert status.startswith(f"{len(expected(0))} of {on_page} tiles on this page match")

    browser.click_and_wait("a[rel=next]")
    assert browser.evaluate("location.pathname").endswith("/page-0002.html")
    assert browser.evaluate("location.hash") == f"#category={category}"
    assert browser.evaluate(VISIBLE_TILES) == expected(1)
    assert browser.evaluate("document.querySelector('#filters select[data-facet=category]')"
                            ".selectedOptions[0].textContent") == category
    # pages without a matching tile are greyed in the pager
    empty = browser.evaluate("[...document.querySelectorAll('header a.page-link')]"
                             ".map(a => a.classList.contains('empty'))")
    assert empty == [not expected(i) for i in range(len(build["pages"]))]

    browser.click_and_wait("a[rel=prev]")
    assert browser.evaluate("location.pathname").endswith("/page-0001.html")
    assert browser.evaluate(VISIBLE_TILES) == expected(0)
    assert browser.errors() == []


def test_summary_and_drop_pages(build, browser):
    browser.errors()
    browser.open(_url(build, "index.html"))
    compare = browser.evaluate("document.querySelector('table.compare').innerText")
    assert "GeoPixelD train" in compare and "GeoPixelD test" in compare and "ours: val" in compare
    assert "740" in compare and "647" in compare and "53,816" in compare
    mean_chars = sum(len(r.caption) for r in build["records"]) / len(build["records"])
    row = browser.evaluate("[...document.querySelectorAll('table.compare tr')].find(tr => "
                           "tr.cells[0].textContent.startsWith('mean caption')).innerText")
    assert f"{mean_chars:,.4f}".rstrip("0").rstrip(".") in row
    reasons = {d.reason for d in build["drops"]}
    drops_table = browser.evaluate("document.querySelector('section#drops table').innerText")
    assert all(r in drops_table for r in reasons)
    browser.click_and_wait("section#drops a[href='drops.html']")
    listed = browser.evaluate("[...document.querySelectorAll('table.drops tbody tr')]"
                              ".map(tr => [tr.cells[0].textContent, "
                              "tr.closest('section').id])")
    assert sorted(listed) == sorted([d.tile_id, f"reason-{d.reason}"] for d in build["drops"])
    assert browser.errors() == []


def test_records_with_failed_claims_come_first_and_the_claims_filter_keeps_them(build, browser):
    browser.errors()
    failing = build["failing"]
    # the renamed record, last in shard order, leads the first page
    assert build["pages"][0][0].record_id == build["boats"].record_id
    browser.open(_url(build, "index.html"))
    summary = browser.evaluate("document.querySelector('table.claims').innerText")
    assert "category" in summary and "position" in summary
    browser.click_and_wait("section#claims a.failed-claims")
    assert browser.evaluate("location.hash") == "#claims=failed"
    expected = [r.tile_id for r in build["pages"][0] if r.record_id in failing]
    assert browser.evaluate(VISIBLE_TILES) == expected
    assert browser.evaluate("document.querySelector('#filters select[data-facet=claims]')"
                            ".selectedOptions[0].textContent") == "failed"
    # each failed claim under its caption: the phrase, the claim, what the masks say
    selector = f'article.tile[data-tile="{build["boats"].tile_id}"] li.claim'
    listed = browser.evaluate(
        f"[...document.querySelectorAll({json.dumps(selector)})]"
        ".map(li => [li.dataset.type, li.querySelector('.words').textContent, "
        "li.querySelector('.expected').textContent])")
    wanted = [[c["type"], c["words"], c["expected"]] for c in build["claims"]
              if c["record_id"] == build["boats"].record_id and c["verdict"] == "disagree"]
    assert listed == wanted and ["category", "boats", "large vehicle"] in listed
    assert browser.errors() == []
