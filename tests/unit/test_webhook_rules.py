"""Webhooks without a network: the signature, the verification code of doc/tracking.rst, the
backoff, the outbox entries and bodies made from events, and the [webhooks.NAME] config."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mtrkmta.config import EVENT_KINDS, ConfigError, Override, Webhook, load_config
from mtrkmta.config.show import render
from mtrkmta.tracking.interfaces import Event, EventKind
from mtrkmta.tracking.outbox import MessageFacts, event_body, outbox_rows
from mtrkmta.webhooks import backoff, sign

DOC = Path(__file__).resolve().parents[2] / "doc" / "tracking.rst"
SECRET = b"whsec_test_secret_0123456789"
FACTS = MessageFacts(
    queue_id="Q1",
    sender="news@Example.org",
    envid="ENV1",
    recipients={0: "bob@example.net", 1: "carol@example.net"},
)


def test_the_signature_is_hmac_sha256_of_the_time_a_dot_and_the_body():
    # Known vector, from openssl: printf 1700000000.{} |
    #   openssl dgst -sha256 -hmac whsec_test_secret_0123456789
    assert sign(SECRET, 1_700_000_000, b"{}") == (
        "t=1700000000,v1=3cd786d75e63491193133ea204b65d54d4c3f7e90d74136bc4479e38abf21574"
    )


def doc_verify():
    """The ``verify`` function of doc/tracking.rst, "Verifying a signature"."""
    text = DOC.read_text(encoding="utf-8").split("Verifying a signature\n", 1)[1]
    block = text.split(".. code-block:: python\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    namespace: dict[str, object] = {}
    exec("\n".join(lines), namespace)  # the documented code, run as written
    return namespace["verify"]


def test_the_documented_verification_accepts_our_signatures_and_nothing_else():
    verify = doc_verify()
    body = b'{"id":"x","kind":"delivered"}'
    now = int(time.time())
    assert verify(SECRET, sign(SECRET, now, body), body)
    assert not verify(SECRET, sign(SECRET, now, body), body + b" ")
    assert not verify(b"another secret, 16+ bytes", sign(SECRET, now, body), body)
    assert not verify(SECRET, sign(SECRET, now - 3600, body), body)  # a replay, later
    assert not verify(SECRET, "v1=00", body)
    assert not verify(SECRET, "", body)


def test_backoff_doubles_up_to_the_maximum_with_equal_jitter():
    assert [backoff(n, 10.0, 3600.0, 0.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert [backoff(n, 10.0, 3600.0, 0.999999) for n in (1, 2)] == pytest.approx([10.0, 20.0])
    assert backoff(30, 10.0, 3600.0, 0.5) == 2700.0  # capped: between 1800 and 3600
    assert backoff(10_000, 10.0, 3600.0, 0.0) == 1800.0  # no overflow


def event(kind: EventKind, recipient: int | None = 0, **detail: str) -> Event:
    return Event("Q1", recipient, 1_796_402_400, kind, tuple(detail.items()))


def test_the_body_names_the_message_the_original_recipient_and_the_outcome():
    deferred = event(
        EventKind.DEFERRED,
        status="4.4.1",
        relay="mx.example.net[192.0.2.25]:25",
        diagnostic="connection refused",
        next_attempt="1796402700",
    )
    body = json.loads(event_body("abc", deferred, FACTS))
    assert body == {
        "id": "abc",
        "kind": "deferred",
        "time": "2026-12-04T16:40:00Z",
        "queue_id": "Q1",
        "envid": "ENV1",
        "sender": "news@Example.org",
        "recipient": "bob@example.net",
        "status": "4.4.1",
        "diagnostic": "connection refused",
        "relay": "mx.example.net[192.0.2.25]:25",
        "next_attempt": "2026-12-04T16:45:00Z",
        "detail": {
            "status": "4.4.1",
            "relay": "mx.example.net[192.0.2.25]:25",
            "diagnostic": "connection refused",
            "next_attempt": "1796402700",
        },
    }
    held = json.loads(event_body("h", event(EventKind.HELD, None, reason="x"), FACTS))
    assert held["recipient"] is None and held["status"] is None and held["next_attempt"] is None


def test_the_body_bounds_and_escapes_what_came_from_the_wire():
    facts = MessageFacts("Q1", "a\r\nForged: yes@example.org", "E" * 2000, {0: "b\x00@x"})
    body = json.loads(event_body("i", event(EventKind.ARRIVED), facts))
    assert body["sender"] == "a\\x{0D}\\x{0A}Forged: yes@example.org"
    assert body["recipient"] == "b\\x{00}@x"
    assert body["envid"] == "E" * 512 + "..."


def test_outbox_rows_go_to_each_hook_that_wants_the_event_with_one_id_per_event():
    everything = Webhook("all", "http://h/", Path("/s"))
    failures = Webhook("failures", "http://h/", Path("/s"), events=frozenset({"failed"}))
    others = Webhook("others", "http://h/", Path("/s"), senders=("other.example",))
    ours = Webhook("ours", "http://h/", Path("/s"), senders=("example.org",))
    ids = iter(["id1", "id2"])
    rows = outbox_rows(
        [event(EventKind.DELIVERED), event(EventKind.FAILED, 1)],
        FACTS,
        (everything, failures, others, ours),
        new_id=lambda: next(ids),
    )
    assert [(r["hook"], r["event_id"]) for r in rows] == [
        ("all", "id1"),
        ("ours", "id1"),
        ("all", "id2"),
        ("failures", "id2"),
        ("ours", "id2"),
    ]
    assert {r["created"] for r in rows} == {r["due"] for r in rows} == {1_796_402_400}
    assert json.loads(str(rows[3]["body"]))["recipient"] == "carol@example.net"
    assert rows[2]["body"] == rows[3]["body"]


def test_a_sender_filter_matches_addresses_and_domains_never_the_null_sender():
    hook = Webhook("h", "http://h/", Path("/s"), senders=("news@example.org", "example.net"))
    assert hook.wants("delivered", "News@Example.ORG")
    assert hook.wants("delivered", "anyone@EXAMPLE.net")
    assert not hook.wants("delivered", "other@example.org")
    assert not hook.wants("delivered", "a@sub.example.net")
    assert not hook.wants("delivered", "")
    assert Webhook("h", "http://h/", Path("/s")).wants("failed", "")


def test_the_config_knows_every_event_kind():
    assert set(EVENT_KINDS) == {kind.value for kind in EventKind}


def secret(tmp_path: Path, mode: int = 0o600, content: bytes = SECRET) -> Path:
    path = tmp_path / "hook.secret"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def load(tmp_path: Path, table: str) -> object:
    config = tmp_path / "mtrkmta.toml"
    config.write_text(table, encoding="utf-8")
    return load_config(config, fqdn=lambda: "mx.example.org")


def test_a_webhook_table_loads_with_its_defaults(tmp_path):
    path = secret(tmp_path)
    config = load(
        tmp_path,
        f'[webhooks.crm]\nurl = "https://hooks.example.com/x"\nsecret_file = "{path}"\n'
        'senders = ["News@Example.org", "example.NET"]\nevents = ["failed"]\ntimeout = "5s"\n',
    )
    (hook,) = config.webhooks  # type: ignore[attr-defined]
    assert hook == Webhook(
        "crm",
        "https://hooks.example.com/x",
        path,
        events=frozenset({"failed"}),
        senders=("news@example.org", "example.net"),
        timeout=5.0,
    )
    assert render(config, ["webhooks"]) == [  # type: ignore[arg-type]
        f'webhooks.crm = {{ url = "https://hooks.example.com/x", secret_file = "{path}", '
        'events = ["failed"], senders = ["news@example.org", "example.net"], timeout = "5s", '
        'max_age = "3d", first_retry = "10s", max_retry_interval = "1h", concurrency = 4, '
        "max_response = 65536 }"
    ]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_secret_file_others_can_read_is_refused_in_one_line(tmp_path, mode):
    path = secret(tmp_path, mode)
    with pytest.raises(ConfigError) as error:
        load(tmp_path, f'[webhooks.crm]\nurl = "http://h.example/"\nsecret_file = "{path}"\n')
    assert str(error.value) == (
        f"config error: {tmp_path / 'mtrkmta.toml'}: webhooks.crm.secret_file: {path} is "
        f"open to group or others (mode {mode:03o}); make it the server's alone: chmod 600 {path}"
    )


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('url = "ftp://h.example/"', "webhooks.crm.url: expected an http:// or https:// URL"),
        ('events = ["sent"]', "webhooks.crm.events: expected event kinds among arrived"),
        ('senders = ["@example.org"]', "webhooks.crm.senders: expected user@domain or a domain"),
        ('max_age = "10s"', "webhooks.crm.max_age: must be at least 1m"),
        ('colour = "red"', "webhooks.crm: unknown key 'colour'"),
        ('first_retry = "2h"', "webhooks.crm.first_retry: first_retry must not exceed"),
    ],
)
def test_a_bad_webhook_key_is_named_in_the_error(tmp_path, table, problem):
    path = secret(tmp_path)
    lines = {"url": '"http://h.example/"', "secret_file": f'"{path}"'}
    key = table.split(" =", 1)[0]
    lines[key] = table.split("= ", 1)[1]
    text = "[webhooks.crm]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load(tmp_path, text)


def test_a_short_secret_and_a_missing_url_are_refused(tmp_path):
    path = secret(tmp_path, content=b"short\n")
    with pytest.raises(ConfigError, match="must hold a secret of at least 16 characters"):
        load(tmp_path, f'[webhooks.crm]\nurl = "http://h.example/"\nsecret_file = "{path}"\n')
    with pytest.raises(ConfigError, match=r"webhooks\.crm: url is required"):
        load(tmp_path, f'[webhooks.crm]\nsecret_file = "{path}"\n')


def test_no_webhooks_by_default():
    config = load_config(None, [Override("t", "server.hostname", "mx.example.org")])
    assert config.webhooks == ()
    assert config.tracking.webhook_outbox_limit == 100000
