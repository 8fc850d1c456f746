"""The tracking page in a real browser: Debian's headless Chromium, driven over the
DevTools protocol, loads ``/track`` from node A's HTTP listener, types the URI of a message
that crossed two nodes, submits the form with the keyboard and shows the timeline of both
hops.

A relays to B by a fixed route to 127.0.0.1, so A's Remote-MTA is ``[127.0.0.1]`` (RFC 3461
§9.3) and A's tracking client asks B's tracking server where ``connect_to`` says that host's
server listens (as ``mtrkmta track --connect-to``). With ``MTRKMTA_SCREENSHOT=PATH`` the
test also saves its screenshot of the result page there (doc/_static/track-page.png).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from cdp import DevTools
from interop_lab import eventually, in_thread, program
from twisted.internet import reactor
from twisted.names import client as dns_client

from mtrkmta.cli import send
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.web.track import Tracker, client_factory

CHROMIUM = "chromium"
DOMAIN = "chain.example"
RCPT = f"bob@{DOMAIN}"
A_NAME, B_NAME = "mx-a.example.test", "mx-b.example.test"
MESSAGE = b"From: alice@localhost\r\nTo: bob@chain.example\r\nSubject: page\r\n\r\nHello.\r\n"
PHONE = {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True}
STARTUP = 60.0


class Browser:
    """Headless Chromium on loopback with its own profile; its DevTools URL from stderr."""

    def __init__(self, profile: Path, reaper: Any) -> None:
        self.profile = profile
        self.reaper = reaper
        self.proc: subprocess.Popen[bytes] | None = None
        self.errors: list[str] = []

    def start(self) -> str:
        """Blocking: start Chromium; the ``ws://`` URL of its DevTools (stderr's line)."""
        self.proc = subprocess.Popen(
            [
                program(CHROMIUM),
                "--headless=new",
                "--no-sandbox",  # the tests may run as root
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-gpu",
                "--no-pings",
                "--metrics-recording-only",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.reaper.add(id(self), [["kill", self.proc.pid, "chromium"]])
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            self.errors.append(line)
            if line.startswith("DevTools listening on ws://"):
                # Keep reading stderr so that Chromium never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return line.removeprefix("DevTools listening on ")
        raise AssertionError("chromium ended without DevTools:\n" + "\n".join(self.errors))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.errors.append(raw.decode("utf-8", "replace").rstrip())

    def stop(self) -> None:
        """Blocking: wait for Chromium to end (after Browser.close), kill it if it does not."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reaper.remove(id(self))


@asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[MTAService, MTAService]]:
    nodes: list[MTAService] = []
    quick = (("durability.fsync", False),)
    try:
        config = node_config(
            tmp_path / "b",
            hostname=B_NAME,
            listeners=("smtp", "mtqp"),
            options=(*quick, ("domains.local", (DOMAIN,))),
        )
        b = await start_node(config)
        nodes.append(b)
        route = f"{DOMAIN}=smtp:tcp:host=127.0.0.1:port={b.port('smtp')};tls=none"
        config = node_config(
            tmp_path / "a",
            hostname=A_NAME,
            listeners=("smtp", "mtqp", "http"),
            options=(*quick, ("routes", route)),
        )
        a = await start_node(config, tracker_factory=tracker_factory(b.port("mtqp")))
        nodes.append(a)
        yield a, b
    finally:
        for node in reversed(nodes):  # upstream first
            await stop_node(node)


async def send_through(a: MTAService, secrets: Path) -> str:
    """`mtrkmta send` through A; the URI it printed."""
    out, err = io.StringIO(), io.StringIO()
    args = [
        "--server",
        f"127.0.0.1:{a.port('smtp')}",
        "--from",
        "alice@localhost",
        "--to",
        RCPT,
        "--secrets",
        str(secrets),
        "--mtqp-server",
        f"127.0.0.1:{a.port('mtqp')}",
        "--hostname",
        "client.example.test",
    ]
    status = await in_thread(send.main, args, stdin=io.BytesIO(MESSAGE), out=out, err=err)
    assert status == 0, err.getvalue()
    return out.getvalue().strip()


def tracker_factory(b_mtqp: int) -> Callable[[], Tracker]:
    """A's tracking clients, which find B's server (``[127.0.0.1]``) at ``b_mtqp``."""

    def connect_to(host: str, port: int | None) -> tuple[str, int] | None:
        return ("127.0.0.1", b_mtqp) if (host, port) == ("127.0.0.1", None) else None

    # Only address literals are asked (no DNS query is made): a resolver of nothing.
    resolver = dns_client.Resolver(servers=[("127.0.0.1", 53)], reactor=reactor)
    return client_factory(reactor, resolver, reply_timeout=20.0, connect_to=connect_to)


# The lowest WCAG 2.1 contrast ratio (§1.4.3) of any text on the page against the
# background it is drawn on: [ratio, the element, its colour, its background].
CONTRAST = """
function luminance(rgb) {
  const [r, g, b] = rgb.match(/[\\d.]+/g).slice(0, 3).map(Number).map(v => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function background(element) {
  for (let e = element; e; e = e.parentElement) {
    const colour = getComputedStyle(e).backgroundColor;
    if (colour !== 'rgba(0, 0, 0, 0)' && colour !== 'transparent') return colour;
  }
  return 'rgb(255, 255, 255)';
}
function lowestContrast() {
  let lowest = [99, '', '', ''];
  for (const element of document.querySelectorAll('main *')) {
    const text = [...element.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!text) continue;
    const fore = getComputedStyle(element).color, back = background(element);
    const [a, b] = [luminance(fore), luminance(back)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    if (ratio < lowest[0]) lowest = [ratio, element.tagName + '.' + element.className, fore, back];
  }
  return lowest;
}
"""


async def press(tools: DevTools, session: str, key: str, code: int, text: str = "") -> None:
    base = {"key": key, "code": key, "windowsVirtualKeyCode": code}
    await tools.call("Input.dispatchKeyEvent", {**base, "type": "keyDown", "text": text}, session)
    await tools.call("Input.dispatchKeyEvent", {**base, "type": "keyUp"}, session)


@pytest_twisted.ensureDeferred
async def test_the_page_shows_a_message_across_two_nodes(tmp_path, reaper):
    program(CHROMIUM)
    async with two_nodes(tmp_path) as (a, b):
        a_mtqp, b_mtqp, b_smtp = a.port("mtqp"), b.port("mtqp"), b.port("smtp")
        uri = await send_through(a, tmp_path / "sent.jsonl")

        async def delivered() -> bool:
            return not await a.spool.queue_ids() and not await b.spool.queue_ids()

        await eventually(delivered, "the message to reach B's Maildir")
        browser = Browser(tmp_path / "profile", reaper)
        tools = DevTools(reactor)
        try:
            await tools.connect(await in_thread(browser.start))
            shot, text, checks = await drive(tools, a.port("http"), uri)
            await tools.call("Browser.close")
        finally:
            await tools.close()
            await in_thread(browser.stop)
    assert "Delivered: 1 recipient, 1 delivered." in text, text
    assert checks["rows"] == [
        ["Hop 1", f"127.0.0.1 (127.0.0.1 port {a_mtqp})"],
        ["Hop 2", f"[127.0.0.1] (127.0.0.1 port {b_mtqp})"],
    ]
    assert checks["reporting"] == [f"dns; {A_NAME}", f"dns; {B_NAME}"]
    assert checks["steps"] == [
        f"Hop 1, {A_NAME}: transferred",
        f"Hop 2, {B_NAME}: delivered",
    ]
    # The timeline: both hops' events in time order, read from their X-Mtrkmta-Event fields.
    assert checks["events"] == [
        f"accepted by {A_NAME} over ESMTP",
        f"transferred to 127.0.0.1[127.0.0.1]:{b_smtp}, which tracks it on "
        "(2.4.0 Other or undefined network or routing status)",
        f"accepted by {B_NAME} over ESMTP",
        "delivered locally: 2.1.5 Destination address valid",
    ]
    assert checks["wide"] <= PHONE["width"], "the page scrolls sideways on a phone"
    assert checks["contrast"][0] >= 4.5, checks["contrast"]  # WCAG 2.1 AA
    assert checks["focused"] == "BUTTON"
    assert uri not in checks["html"] and uri.rsplit("/", 1)[1] not in checks["html"]
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "track-page.png").write_bytes(shot)
    wanted = os.environ.get("MTRKMTA_SCREENSHOT")
    if wanted:
        Path(wanted).write_bytes(shot)


async def drive(tools: DevTools, port: int, uri: str) -> tuple[bytes, str, dict[str, Any]]:
    """Open /track in a phone-sized page, type the URI, Tab to *Track*, press Enter; the
    screenshot, the text of <main> and what the checks read from the DOM."""
    (target,) = [
        t for t in (await tools.call("Target.getTargets"))["targetInfos"] if t["type"] == "page"
    ]
    attached = await tools.call(
        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
    )
    session = attached["sessionId"]
    await tools.call("Page.enable", session=session)
    await tools.call("Emulation.setDeviceMetricsOverride", PHONE, session)
    loaded = tools.event("Page.loadEventFired", session)
    await tools.call("Page.navigate", {"url": f"http://127.0.0.1:{port}/track"}, session)
    await loaded
    assert await tools.evaluate("document.title", session) == "Track a message"
    await tools.evaluate("document.getElementById('uri').focus()", session)
    await tools.call("Input.insertText", {"text": uri}, session)
    for _ in range(4):  # envid, secret, server, then the button
        await press(tools, session, "Tab", 9)
    focused = await tools.evaluate("document.activeElement.tagName", session)
    loaded = tools.event("Page.loadEventFired", session)
    await press(tools, session, "Enter", 13, "\r")
    await loaded
    await tools.evaluate(CONTRAST, session)
    checks: dict[str, Any] = json.loads(
        await tools.evaluate(
            """JSON.stringify({
                rows: [...document.querySelectorAll('tbody tr')].map(
                    r => [r.cells[0].textContent, r.cells[1].textContent]),
                reporting: [...document.querySelectorAll('tbody tr')].map(
                    r => r.cells[2].textContent),
                steps: [...document.querySelectorAll('.recipient li')].map(
                    li => li.childNodes[0].textContent + li.querySelector('.action').textContent),
                events: [...document.querySelectorAll('ol.timeline li .what')].map(
                    e => e.textContent),
                wide: document.documentElement.scrollWidth,
                contrast: lowestContrast(),
                html: document.documentElement.outerHTML,
            })""",
            session,
        )
    )
    checks["focused"] = focused
    text = await tools.evaluate("document.querySelector('main').innerText", session)
    metrics = await tools.call("Page.getLayoutMetrics", session=session)
    size = metrics["cssContentSize"]
    picture = await tools.call(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
        session,
    )
    return base64.b64decode(picture["data"]), text, checks
