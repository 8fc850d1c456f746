"""MAIL/RCPT parameters (DSN, MTRK, SIZE, BODY, SMTPUTF8) over real loopback sockets:
exact replies for malformed, repeated and unknown parameters, line lengths, and what an
accepted message's parameters become in the tracking store and the spool envelope."""

from __future__ import annotations

import base64
import hashlib

import pytest
import pytest_twisted
from smtpwire import Wire, in_thread, message, queue_id_of, queued_everywhere, running_node

from mtrkmta.envelope import Mtrk, OriginalRecipient

SENDER = "MAIL FROM:<sender@client.example>"
RCPT = "RCPT TO:<alice@localhost>"

SECRET = bytes(range(16))
C20 = "VheLhqV/rCKJmplkGFwsyW59pYk="  # our vector: base64(SHA1(00 01 .. 0f)), RFC 3885 §3.1
B20 = base64.b64decode(C20)
C16 = base64.b64encode(bytes(range(16))).decode()  # a 128-bit certifier, 24 chars


def _b64(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


ENVID_100 = "e" * 88 + "@client.test"  # exactly 100 characters
assert len(ENVID_100) == 100

OK_MAIL = "250 2.1.0 Ok"
OK_RCPT = "250 2.1.5 Ok"
BAD_MTRK = "501 5.5.4 Invalid MTRK parameter"
MTRK_NEEDS_ENVID = "501 5.5.4 MTRK requires ENVID=local@host"
BAD_ENVID = "501 5.5.4 Invalid ENVID parameter"
BAD_NOTIFY = "501 5.5.4 Invalid NOTIFY parameter"
BAD_ORCPT = "501 5.5.4 Invalid ORCPT parameter"

# MAIL parameters (after EHLO) -> the exact reply line.
MAIL_CASES = [
    # RFC 3885 §3.2, doc/conformance.rst 3885-P3: MTRK requires a unique ENVID.
    pytest.param(f"MTRK={C20}:3600", MTRK_NEEDS_ENVID, id="mtrk-without-envid"),
    pytest.param(f"MTRK={C20}:3600 ENVID=no-at-sign", MTRK_NEEDS_ENVID, id="mtrk-envid-no-at"),
    pytest.param(f"ENVID=abc MTRK={C20}", MTRK_NEEDS_ENVID, id="mtrk-after-non-unique-envid"),
    # RFC 3885 §3.1, doc/conformance.rst 3885-P1: certifier base64 decoding to 16 or 20 octets only.
    pytest.param(f"MTRK={_b64(15)} ENVID=a@b.test", BAD_MTRK, id="certifier-15-octets"),
    pytest.param(f"MTRK={_b64(17)} ENVID=a@b.test", BAD_MTRK, id="certifier-17-octets"),
    pytest.param(f"MTRK={_b64(19)} ENVID=a@b.test", BAD_MTRK, id="certifier-19-octets"),
    pytest.param(f"MTRK={_b64(21)} ENVID=a@b.test", BAD_MTRK, id="certifier-21-octets"),
    pytest.param(f"MTRK={_b64(32)} ENVID=a@b.test", BAD_MTRK, id="certifier-32-octets"),
    pytest.param("MTRK=A ENVID=a@b.test", BAD_MTRK, id="certifier-one-char"),
    pytest.param(f"MTRK={C20}= ENVID=a@b.test", BAD_MTRK, id="certifier-extra-padding"),
    pytest.param(f"MTRK={C16[:-1]} ENVID=a@b.test", BAD_MTRK, id="certifier-short-padding"),
    pytest.param(f"MTRK={C20.replace('/', '-')} ENVID=a@b.test", BAD_MTRK, id="certifier-not-b64"),
    pytest.param("MTRK=:60 ENVID=a@b.test", BAD_MTRK, id="certifier-empty"),
    pytest.param("MTRK ENVID=a@b.test", BAD_MTRK, id="mtrk-no-value"),
    pytest.param("MTRK= ENVID=a@b.test", BAD_MTRK, id="mtrk-empty-value"),
    # RFC 3885 §3.1: timeout 1 to 9 digits, no sign, not empty.
    pytest.param(f"MTRK={C20}:1234567890 ENVID=a@b.test", BAD_MTRK, id="timeout-10-digits"),
    pytest.param(f"MTRK={C20}: ENVID=a@b.test", BAD_MTRK, id="timeout-empty"),
    pytest.param(f"MTRK={C20}:+60 ENVID=a@b.test", BAD_MTRK, id="timeout-plus-sign"),
    pytest.param(f"MTRK={C20}:-60 ENVID=a@b.test", BAD_MTRK, id="timeout-minus-sign"),
    pytest.param(f"MTRK={C20}:6O ENVID=a@b.test", BAD_MTRK, id="timeout-letter"),
    pytest.param(f"MTRK={C20}:60:60 ENVID=a@b.test", BAD_MTRK, id="timeout-twice"),
    # doc/conformance.rst 3885-P3: a second MTRK.
    pytest.param(f"MTRK={C20} MTRK={C20} ENVID=a@b.test", BAD_MTRK, id="mtrk-twice"),
    pytest.param(f"MTRK={C20} mtrk={C16} ENVID=a@b.test", BAD_MTRK, id="mtrk-twice-any-case"),
    # RFC 3461 §4, §4.4-§4.5, doc/conformance.rst 3461-P5: ENVID value (decoded control octets
    # refused).
    pytest.param("ENVID", "501 5.5.4 ENVID requires a value", id="envid-no-value"),
    pytest.param("ENVID=", "501 5.5.4 ENVID requires a value", id="envid-empty"),
    pytest.param("ENVID=" + "e" * 101, "501 5.5.4 ENVID too long", id="envid-101-chars"),
    pytest.param("ENVID=" + "+41" * 101, "501 5.5.4 ENVID too long", id="envid-101-decoded"),
    pytest.param("ENVID=abc+2bdef", BAD_ENVID, id="envid-lower-case-hex"),
    pytest.param("ENVID=abc+2Gdef", BAD_ENVID, id="envid-bad-hex"),
    pytest.param("ENVID=abc+4", BAD_ENVID, id="envid-truncated-hex"),
    pytest.param("ENVID=a=b", BAD_ENVID, id="envid-raw-equals"),
    pytest.param("ENVID=a+0Db", BAD_ENVID, id="envid-decoded-cr"),
    pytest.param("ENVID=a+0Ab", BAD_ENVID, id="envid-decoded-lf"),
    pytest.param("ENVID=a+00b", BAD_ENVID, id="envid-decoded-nul"),
    pytest.param("ENVID=a+7Fb", BAD_ENVID, id="envid-decoded-del"),
    pytest.param("ENVID=a+C3+A9b", BAD_ENVID, id="envid-decoded-8bit"),
    pytest.param("ENVID=caf\u00e9", BAD_ENVID, id="envid-raw-utf8"),
    # RFC 3461 §4.3: RET.
    pytest.param("RET=NONE", "501 5.5.4 Invalid RET parameter", id="ret-unknown"),
    pytest.param("RET", "501 5.5.4 RET requires a value", id="ret-no-value"),
    # RFC 3461 §4.5, §5.1(a)-(b), doc/conformance.rst 3461-P3: repeated parameters.
    pytest.param("ENVID=a ENVID=b", "501 5.5.4 Duplicate ENVID parameter", id="envid-twice"),
    pytest.param("ENVID=a envid=a", "501 5.5.4 Duplicate ENVID parameter", id="envid-twice-case"),
    pytest.param("RET=FULL RET=HDRS", "501 5.5.4 Duplicate RET parameter", id="ret-twice"),
    pytest.param("RET=FULL ret=full", "501 5.5.4 Duplicate RET parameter", id="ret-twice-case"),
    pytest.param("SIZE=1 SIZE=1", "501 5.5.4 Duplicate SIZE parameter", id="size-twice"),
    pytest.param("BODY=7BIT BODY=7BIT", "501 5.5.4 Duplicate BODY parameter", id="body-twice"),
    # RFC 5321 §4.1.1.11, doc/conformance.rst 3461-P3: unknown or not advertised -> 555 5.5.4.
    pytest.param("FOO=bar", "555 5.5.4 Unsupported parameter FOO", id="unknown"),
    pytest.param("x-custom", "555 5.5.4 Unsupported parameter X-CUSTOM", id="unknown-no-value"),
    pytest.param("NOTIFY=NEVER", "555 5.5.4 Unsupported parameter NOTIFY", id="rcpt-param-on-mail"),
    pytest.param("AUTH=<>", "555 5.5.4 AUTH not supported", id="auth-not-advertised"),
    # Other extensions.
    pytest.param("SIZE=12k", "501 5.5.4 Invalid SIZE parameter", id="size-not-digits"),
    pytest.param("BODY=BINARY", "555 5.5.4 Unsupported BODY type", id="body-binary"),
    pytest.param("SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value", id="smtputf8-value"),
]

# MAIL parameters that must be accepted with the plain reply (RFC 3461 §5.1(a)).
MAIL_ACCEPTED = [
    # doc/conformance.rst 3885-P1: padded or unpadded, 160-bit or 128-bit certifiers.
    pytest.param(f"MTRK={C20}:3600 ENVID=msg1@client.test", id="padded-sha1"),
    pytest.param(f"MTRK={C20[:-1]} ENVID=msg1@client.test", id="unpadded-sha1"),
    pytest.param(f"MTRK={C16}:60 ENVID=msg1@client.test", id="128-bit"),
    pytest.param(f"MTRK={C16[:-2]} ENVID=msg1@client.test", id="128-bit-unpadded"),
    # RFC 3885 §3.1: 0..999999999 seconds, 1 to 9 digits.
    pytest.param(f"MTRK={C20}:0 ENVID=msg1@client.test", id="timeout-zero"),
    pytest.param(f"MTRK={C20}:999999999 ENVID=msg1@client.test", id="timeout-9-digits"),
    pytest.param(f"MTRK={C20}:000000001 ENVID=msg1@client.test", id="timeout-leading-zeros"),
    # RFC 5321 §2.4: keywords in any case, in any order.
    pytest.param(f"mtrk={C20}:60 envid=msg1@client.test ret=hdrs", id="lower-case"),
    pytest.param(f"EnvId=msg1@client.test MtRk={C20}", id="mixed-case-envid-first"),
    # RFC 3885 §3.2: unique-envid split at the last @ (an xchar); escaped base64 host hash.
    pytest.param(f"MTRK={C20} ENVID=a@b@client.test", id="envid-at-in-local-part"),
    pytest.param(f"MTRK={C20} ENVID=local+40client.test", id="envid-xtext-encoded-at"),
    pytest.param(f"MTRK={C20} ENVID=m@" + "A+2BB+3D" * 3, id="hashed-fqhn-escaped"),
    # RFC 3461 §4.4: without MTRK, ENVID is free-form.
    pytest.param("ENVID=free-form-without-at", id="envid-without-mtrk"),
    # RFC 3461 §4.4: up to 100 decoded characters, space and HTAB allowed.
    pytest.param("ENVID=" + "e" * 100, id="envid-100-chars"),
    pytest.param("ENVID=" + "+41" * 100, id="envid-100-decoded"),
    pytest.param("ENVID=with+20space+09tab", id="envid-space-and-tab"),
    # RFC 3461 §4.3: RET in any case.
    pytest.param("RET=FULL", id="ret-full"),
    pytest.param("RET=hdrs", id="ret-hdrs-lower"),
    pytest.param("SIZE=0 BODY=7BIT", id="size-body"),
    pytest.param("BODY=8bitmime SMTPUTF8", id="8bitmime-smtputf8"),
    pytest.param("BODY=BINARYMIME", id="binarymime"),  # RFC 3030 §3: advertised with CHUNKING
]

# RCPT parameters (after a good MAIL) -> the exact reply line.
RCPT_CASES = [
    # RFC 3461 §4.1: NOTIFY.
    pytest.param("NOTIFY=NEVER,SUCCESS", BAD_NOTIFY, id="never-and-success"),
    pytest.param("NOTIFY=FAILURE,NEVER", BAD_NOTIFY, id="failure-and-never"),
    pytest.param("NOTIFY=NEVER,NEVER", BAD_NOTIFY, id="never-twice"),
    pytest.param("NOTIFY=SUCCESS,,DELAY", BAD_NOTIFY, id="empty-element"),
    pytest.param("NOTIFY=SUCCESS,", BAD_NOTIFY, id="trailing-comma"),
    pytest.param("NOTIFY=,FAILURE", BAD_NOTIFY, id="leading-comma"),
    pytest.param("NOTIFY=ALWAYS", BAD_NOTIFY, id="unknown-keyword"),
    pytest.param("NOTIFY=SUCCESS;FAILURE", BAD_NOTIFY, id="wrong-separator"),
    pytest.param("NOTIFY", "501 5.5.4 NOTIFY requires a value", id="notify-no-value"),
    pytest.param("NOTIFY=", "501 5.5.4 NOTIFY requires a value", id="notify-empty"),
    # RFC 3461 §4, §4.2, §5.2.1(d), doc/conformance.rst 3461-P5: ORCPT.
    pytest.param("ORCPT=bob@example.test", BAD_ORCPT, id="orcpt-no-type"),
    pytest.param("ORCPT=;bob@example.test", BAD_ORCPT, id="orcpt-empty-type"),
    pytest.param("ORCPT=rfc(822);bob@example.test", BAD_ORCPT, id="orcpt-type-not-atom"),
    pytest.param("ORCPT=rfc822;", BAD_ORCPT, id="orcpt-empty-address"),
    pytest.param("ORCPT=rfc822;bob+2bx@example.test", BAD_ORCPT, id="orcpt-lower-case-hex"),
    pytest.param("ORCPT=rfc822;bob=x@example.test", BAD_ORCPT, id="orcpt-raw-equals"),
    pytest.param("ORCPT=rfc822;bob+0D+0AX:@example.test", BAD_ORCPT, id="orcpt-decoded-crlf"),
    pytest.param("ORCPT=rfc822;b+FFob@example.test", BAD_ORCPT, id="orcpt-decoded-8bit"),
    pytest.param(
        "ORCPT=rfc822;" + "a" * 480 + "@example.test1",
        "501 5.5.4 ORCPT too long",
        id="orcpt-501-chars",
    ),
    pytest.param("ORCPT", "501 5.5.4 ORCPT requires a value", id="orcpt-no-value"),
    # RFC 3461 §4.5, §5.1(b), doc/conformance.rst 3461-P3: repeated parameters.
    pytest.param(
        "NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Duplicate NOTIFY parameter", id="notify-twice"
    ),
    pytest.param(
        "ORCPT=rfc822;a@x.test orcpt=rfc822;a@x.test",
        "501 5.5.4 Duplicate ORCPT parameter",
        id="orcpt-twice",
    ),
    # RFC 5321 §4.1.1.11, doc/conformance.rst 3461-P3: unknown parameters.
    pytest.param("FOO=1", "555 5.5.4 Unsupported parameter FOO", id="unknown"),
    pytest.param("RET=FULL", "555 5.5.4 Unsupported parameter RET", id="mail-param-on-rcpt"),
    pytest.param("ENVID=x", "555 5.5.4 Unsupported parameter ENVID", id="envid-on-rcpt"),
]

# RCPT parameters that must be accepted with the plain reply (RFC 3461 §5.1(b)).
RCPT_ACCEPTED = [
    pytest.param("NOTIFY=NEVER", id="never"),
    pytest.param("notify=never", id="never-lower"),
    pytest.param("NOTIFY=success,Failure,DELAY", id="all-three-any-case"),
    pytest.param("NOTIFY=FAILURE,FAILURE", id="repeated-element"),  # doc/conformance.rst 3461-P7
    pytest.param("ORCPT=rfc822;Bob@Example.Test", id="orcpt"),
    pytest.param("ORCPT=x-unregistered;whatever+20it+20is", id="orcpt-other-type"),
    pytest.param("ORCPT=rfc822;bob+2Bext+3Dx@example.test", id="orcpt-escaped"),
    pytest.param("ORCPT=rfc822;" + "a" * 480 + "@example.test", id="orcpt-500-chars"),
    pytest.param(
        "NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;" + "+41" * 160 + "@example.test",
        id="notify-and-long-orcpt",
    ),
]


def _exchange(port, mail_line, rcpt_line=None):
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        mail = wire.command(mail_line)
        if rcpt_line is None:
            return mail, None
        rcpt = wire.command(rcpt_line)
        return mail, rcpt


@pytest.mark.parametrize(("params", "expected"), MAIL_CASES)
@pytest_twisted.ensureDeferred
async def test_mail_parameter_refused(tmp_path, params, expected):
    # RFC 3885 §3.1-§3.2, RFC 3461 §4-§5.1, doc/conformance.rst 3885-P3, 3461-P3 (reply table)
    async with running_node(tmp_path) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), f"{SENDER} {params}", RCPT)
    assert mail.line == expected
    # The refused MAIL started no transaction.
    assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"


@pytest.mark.parametrize("params", MAIL_ACCEPTED)
@pytest_twisted.ensureDeferred
async def test_mail_parameter_accepted(tmp_path, params):
    # RFC 3461 §5.1(a), RFC 3885 §3.1-§3.2: same reply as a plain MAIL.
    async with running_node(tmp_path) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), f"{SENDER} {params}", RCPT)
    assert mail.line == OK_MAIL
    assert rcpt.line == OK_RCPT


@pytest.mark.parametrize(("params", "expected"), RCPT_CASES)
@pytest_twisted.ensureDeferred
async def test_rcpt_parameter_refused(tmp_path, params, expected):
    # RFC 3461 §4-§4.2, §4.5, §5.1(b); RFC 5321 §4.1.1.11; doc/conformance.rst 3461-P3
    async with running_node(tmp_path) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), SENDER, f"{RCPT} {params}")
    assert mail.line == OK_MAIL
    assert rcpt.line == expected


@pytest.mark.parametrize("params", RCPT_ACCEPTED)
@pytest_twisted.ensureDeferred
async def test_rcpt_parameter_accepted(tmp_path, params):
    # RFC 3461 §5.4 (ORCPT up to 500), §4.1-§4.2, §5.1(b)
    async with running_node(tmp_path) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), SENDER, f"{RCPT} {params}")
    assert mail.line == OK_MAIL
    assert rcpt.line == OK_RCPT


# RFC 5321 §4.5.3.1.3: a path is at most 256 octets, brackets included.
LONG_LOCAL = "l" * 64
LONG_DOMAIN = "a" * 63 + "." + "b" * 63 + "." + "c" * 53 + ".example"
assert len(f"<{LONG_LOCAL}@{LONG_DOMAIN}>") == 256


@pytest.mark.parametrize(
    "envid",
    [
        pytest.param(ENVID_100, id="100-char-envid"),
        pytest.param("+2B" * 88 + "@client.test", id="100-char-envid-all-escaped"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_maximal_mail_line_is_accepted(tmp_path, envid):
    # RFC 3461 §5.4, RFC 3885 §2, doc/conformance.rst 3885-P2: a 256-octet path with every
    # extension's parameter at its longest (SIZE, BODY, RET, 100-character ENVID, SHA-1 MTRK
    # with 9-digit timeout).
    line = (
        f"MAIL FROM:<{LONG_LOCAL}@{LONG_DOMAIN}> SIZE=35000000 BODY=8BITMIME RET=HDRS"
        f" ENVID={envid} MTRK={C20}:999999999 SMTPUTF8"
    )
    async with running_node(tmp_path) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), line, RCPT)
        assert mail.line == OK_MAIL
        assert rcpt.line == OK_RCPT


@pytest_twisted.ensureDeferred
async def test_long_rcpt_line_with_dsn_parameters_is_accepted(tmp_path):
    # RFC 3461 §5.4, RFC 3885 §2: a 256-octet path, NOTIFY (28) and ORCPT (500) together.
    orcpt = "ORCPT=rfc822;" + "a" * 474 + "@example.test"
    assert len(orcpt) == 500
    line = f"RCPT TO:<{LONG_LOCAL}@{LONG_DOMAIN}> NOTIFY=SUCCESS,FAILURE,DELAY {orcpt}"
    assert len(line) + 2 > 512
    options = (("domains.local", (LONG_DOMAIN,)),)
    async with running_node(tmp_path, options=options) as node:
        mail, rcpt = await in_thread(_exchange, node.port("smtp"), SENDER, line)
    assert mail.line == OK_MAIL
    assert rcpt.line == OK_RCPT


@pytest_twisted.ensureDeferred
async def test_lenient_xtext_switch_accepts_lower_case_hex(tmp_path):
    # RFC 3461 §4, doc/conformance.rst 3461-P4: lower-case hex is refused by default, accepted
    # behind the switch.
    options = (("tracking.lenient_xtext", True),)
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                mail = wire.command(f"{SENDER} ENVID=abc+2bdef@client.test MTRK={C20}")
                rcpt = wire.command(f"{RCPT} ORCPT=rfc822;bob+2bx@example.test")
                return mail, rcpt, wire.data(message())

        mail, rcpt, done = await in_thread(talk)
        assert mail.line == OK_MAIL
        assert rcpt.line == OK_RCPT
        stored = await queued_everywhere(node, queue_id_of(done))
        assert stored.envid == "abc+def@client.test"
        assert stored.recipients[0].orcpt == OriginalRecipient("rfc822", "bob+x@example.test")


@pytest_twisted.ensureDeferred
async def test_parameters_are_recorded_in_tracking_store_and_spool(tmp_path):
    # RFC 3885 §3.1 (decoded certifier stored), RFC 3461 §4.4 (ENVID xtext-decoded, case kept),
    # §5.2.1(d) (ORCPT byte-exact), §4.1 (NOTIFY as given, None when absent).
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                replies = [
                    wire.command(
                        f"{SENDER} RET=hdrs ENVID=Msg+2B1@Client.Test MTRK={C20}:3600"
                        " SIZE=500 BODY=8BITMIME"
                    ),
                    wire.command(
                        "RCPT TO:<alice@localhost> NOTIFY=success,DELAY"
                        " ORCPT=rfc822;Alice+2Bx@Example.Test"
                    ),
                    wire.command("RCPT TO:<bob@localhost>"),
                    wire.command("RCPT TO:<carol@localhost> NOTIFY=NEVER ORCPT=x-local;carol"),
                ]
                return replies, wire.data(message())

        replies, done = await in_thread(talk)
        assert [r.line for r in replies] == [OK_MAIL, OK_RCPT, OK_RCPT, OK_RCPT]
        queue_id = queue_id_of(done)
        stored = await queued_everywhere(node, queue_id)
        assert stored.tracked
        assert stored.envid == "Msg+1@Client.Test"
        assert stored.certifier == B20 == hashlib.sha1(SECRET).digest()
        assert stored.requested_timeout == 3600
        assert stored.ret == "HDRS"
        assert stored.body == "8BITMIME"
        assert stored.sender == "sender@client.example"
        alice, bob, carol = stored.recipients
        assert [r.index for r in stored.recipients] == [0, 1, 2]
        assert alice.address == "alice@localhost"
        assert alice.orcpt == OriginalRecipient("rfc822", "Alice+x@Example.Test")
        assert alice.notify == frozenset({"SUCCESS", "DELAY"})
        assert bob.orcpt is None and bob.notify is None
        assert bob.original == OriginalRecipient("rfc822", "bob@localhost")
        assert carol.orcpt == OriginalRecipient("x-local", "carol")
        assert carol.notify == frozenset({"NEVER"})

        envelope, _ = await node.spool.load(queue_id)
        assert envelope.queue_id == queue_id
        assert envelope.sender == "sender@client.example"
        assert envelope.params.envid == "Msg+1@Client.Test"
        assert envelope.params.mtrk == Mtrk(certifier=B20, timeout=3600)
        assert envelope.params.ret == "HDRS"
        assert envelope.params.size == 500
        assert envelope.params.body == "8BITMIME"
        assert [r.address for r in envelope.recipients] == [
            "alice@localhost",
            "bob@localhost",
            "carol@localhost",
        ]
        assert envelope.recipients[0].params.orcpt == alice.orcpt
        assert envelope.recipients[0].params.notify == frozenset({"SUCCESS", "DELAY"})
        assert envelope.recipients[1].params.orcpt is None
        assert envelope.recipients[1].params.notify is None
        assert envelope.recipients[2].params.notify == frozenset({"NEVER"})


@pytest_twisted.ensureDeferred
async def test_untracked_message_has_no_certifier(tmp_path):
    # RFC 3461 §4.4, doc/conformance.rst 3887-P4: ENVID without MTRK is kept but the message is
    # not tracked.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(f"{SENDER} ENVID=plain-id")
                wire.command(RCPT)
                return wire.data(message())

        queue_id = queue_id_of(await in_thread(talk))
        stored = await queued_everywhere(node, queue_id)
        assert stored.envid == "plain-id"
        assert stored.certifier is None
        assert not stored.tracked
        envelope, _ = await node.spool.load(queue_id)
        assert envelope.params.mtrk is None


@pytest_twisted.ensureDeferred
async def test_mtrk_with_16_octet_certifier_is_stored_decoded(tmp_path):
    # doc/conformance.rst 3885-P1: a 128-bit certifier is accepted and stored as its 16 octets.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(f"{SENDER} MTRK={C16[:-2]} ENVID=x@client.test")
                wire.command(RCPT)
                return wire.data(message())

        stored = await queued_everywhere(node, queue_id_of(await in_thread(talk)))
        assert stored.certifier == bytes(range(16))
        assert stored.requested_timeout is None
