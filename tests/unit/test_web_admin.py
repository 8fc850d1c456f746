"""The admin API (mtrkmta.web.admin) over a memory queue: the bearer token, and answers equal
to the control socket's (what `mtrkmta queue list --json` and `queue show --json` print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_queue_service import Node
from test_web_site import LIMITS, Client, split
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from mtrkmta.config import ConfigError, Override, load_config
from mtrkmta.queue.control import ControlFactory
from mtrkmta.web.admin import MOUNT, TokenFileError, admin_api, bearer_token, read_token
from mtrkmta.web.site import build_site

TOKEN = b"0123456789abcdef-admin-token"


def site_for(node: Node | None) -> Any:
    queue = None if node is None else node.queue
    clock = MemoryReactorClock() if node is None else node.clock
    return build_site({MOUNT: admin_api(TOKEN, lambda: queue)}, LIMITS, clock)


def get(site: Any, path: bytes, authorization: bytes | None = None) -> tuple[int, dict, Any]:
    header = b"" if authorization is None else b"Authorization: " + authorization + b"\r\n"
    client = Client(site)
    status, headers, body = split(client.send(b"GET " + path + b" HTTP/1.1\r\n" + header + b"\r\n"))
    client.close()
    return status, headers, json.loads(body)


def control(node: Node, request: dict[str, Any]) -> Any:
    """The control socket's answer to one request (what `mtrkmta queue --json` prints)."""
    protocol = ControlFactory(node.queue).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(json.dumps(request).encode() + b"\n")
    answer = json.loads(transport.value())
    assert answer["ok"], answer
    return answer["result"]


@pytest_twisted.ensureDeferred
async def test_the_queue_as_the_control_socket_lists_and_shows_it():
    node = Node()
    await node.accept("q0001", "a@one.example", "b@two.example", enqueue=False)
    await node.accept("q0002", "c@one.example", enqueue=False)
    site = site_for(node)
    status, headers, listing = get(site, b"/api/v1/queue", b"Bearer " + TOKEN)
    assert status == 200
    assert headers[b"cache-control"] == b"no-store"
    assert [m["queue_id"] for m in listing] == ["q0001", "q0002"]
    assert listing == control(node, {"command": "list"})
    status, _, shown = get(site, b"/api/v1/queue/q0001", b"Bearer " + TOKEN)
    assert status == 200
    assert shown == control(node, {"command": "show", "queue_id": "q0001"})
    assert [e["kind"] for e in shown["events"]] == ["arrived"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_queue_id_is_404_with_its_code():
    node = Node()
    status, _, body = get(site_for(node), b"/api/v1/queue/q9999", b"Bearer " + TOKEN)
    assert (status, body["error"]["code"]) == (404, "unknown_queue_id")
    status, _, body = get(site_for(node), b"/api/v1/queue/q1/more", b"Bearer " + TOKEN)
    assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    "authorization",
    [None, b"Basic YWRtaW46c2VjcmV0", b"Bearer", b"Bearer ", b"Token " + TOKEN],
)
def test_without_a_bearer_token_the_answer_is_401(authorization):
    status, headers, body = get(site_for(Node()), b"/api/v1/queue", authorization)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert headers[b"www-authenticate"] == b'Bearer realm="mtrkmta"'


@pytest.mark.parametrize("token", [TOKEN[:-1], TOKEN + b"x", b"x" * len(TOKEN), TOKEN.upper()])
def test_a_wrong_token_is_401_and_never_logged(token):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        status, headers, body = get(site_for(Node()), b"/api/v1/queue/q1", b"Bearer " + token)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert headers[b"www-authenticate"] == b'Bearer realm="mtrkmta", error="invalid_token"'
    assert events  # the refusal is logged ...
    assert not [e for e in events if token.decode() in repr(e) or TOKEN.decode() in repr(e)]


def test_the_scheme_is_case_insensitive():
    # RFC 6750 §2.1 uses the HTTP authentication framework, whose scheme names are
    # case-insensitive (RFC 9110 §11.1).
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.requestHeaders.addRawHeader(b"authorization", b"bearer  " + TOKEN)
    assert bearer_token(request) == TOKEN


def test_no_queue_yet_is_503():
    status, _, body = get(site_for(None), b"/api/v1/queue", b"Bearer " + TOKEN)
    assert (status, body["error"]["code"]) == (503, "not_ready")


def test_the_token_file_is_read_without_surrounding_space(tmp_path: Path):
    path = tmp_path / "token"
    path.write_bytes(b"  " + TOKEN + b"\n")
    assert read_token(path) == TOKEN


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"\n", "is empty"), (b"two words\n", "one word of printable ASCII")],
)
def test_an_unusable_token_file_is_one_line_naming_it(tmp_path: Path, content, problem):
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(TokenFileError) as caught:
        read_token(path)
    message = str(caught.value)
    assert str(path) in message and "http.admin_token_file" in message and problem in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_token_file_others_may_read_is_refused_at_load(tmp_path: Path, mode):
    path = tmp_path / "token"
    path.write_bytes(TOKEN)
    path.chmod(mode)
    toml = tmp_path / "mtrkmta.toml"
    toml.write_text(f'[http]\nadmin_token_file = "{path}"\n')
    overrides = (Override("test", "server.data_dir", str(tmp_path)),)
    with pytest.raises(ConfigError) as caught:
        load_config(toml, overrides, fqdn=lambda: "mx.example.test")
    message = str(caught.value)
    assert "http.admin_token_file" in message and str(path) in message
    assert f"chmod 600 {path}" in message and "\n" not in message
    path.chmod(0o600)
    config = load_config(toml, overrides, fqdn=lambda: "mx.example.test")
    assert config.http.admin_token_file == path
