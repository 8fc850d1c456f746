"""Round trips and strictness of the spool's envelope codec."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.envelope import (
    ClientInfo,
    DeliverBy,
    Envelope,
    MailParams,
    Mtrk,
    OriginalRecipient,
    RcptParams,
    Recipient,
)
from mtrkmta.spool.codec import CODEC_VERSION, CodecError, decode_envelope, encode_envelope

# Any code point, lone surrogates included (an SMTP layer may decode with surrogateescape).
texts = st.text(st.characters(exclude_categories=()), max_size=40)
opt_texts = st.none() | texts
opt_ints = st.none() | st.integers(min_value=-(2**70), max_value=2**70)

mtrks = st.builds(
    Mtrk,
    certifier=st.binary(min_size=0, max_size=32),
    timeout=opt_ints,
)
mail_params = st.builds(
    MailParams,
    size=opt_ints,
    body=opt_texts,
    envid=opt_texts,
    ret=opt_texts,
    mtrk=st.none() | mtrks,
    smtputf8=st.booleans(),
    auth=opt_texts,
    envid_xtext=opt_texts,
    deliver_by=st.none()
    | st.builds(DeliverBy, st.integers(), st.sampled_from(["N", "R"]), st.booleans()),
)
rcpt_params = st.builds(
    RcptParams,
    notify=st.none() | st.frozensets(texts, max_size=4),
    orcpt=st.none() | st.builds(OriginalRecipient, texts, texts, opt_texts),
)
recipients = st.builds(Recipient, address=texts, params=rcpt_params)
clients = st.builds(
    ClientInfo,
    address=texts,
    port=st.integers(min_value=0, max_value=65535),
    helo=texts,
    protocol=texts,
    authenticated_as=opt_texts,
    listener=texts,
)
envelopes = st.builds(
    Envelope,
    queue_id=texts,
    sender=texts,
    recipients=st.lists(recipients, max_size=5).map(tuple),
    params=mail_params,
    arrival=st.floats(allow_nan=False, allow_infinity=False),
    client=clients,
)


@settings(max_examples=100, deadline=None)
@given(envelopes)
def test_round_trip(envelope: Envelope) -> None:
    data = encode_envelope(envelope)
    assert data.isascii()
    assert decode_envelope(data) == envelope


def _sample() -> Envelope:
    return Envelope(
        queue_id="0abc",
        sender="a@example.org",
        recipients=(
            Recipient("b@example.org"),
            Recipient(
                "c@example.org",
                RcptParams(frozenset({"SUCCESS", "DELAY"}), OriginalRecipient("rfc822", "c@x")),
            ),
        ),
        params=MailParams(
            size=1234,
            body="8BITMIME",
            envid="E1",
            ret="HDRS",
            mtrk=Mtrk(bytes(range(20)), 3600),
            smtputf8=True,
            auth="<>",
        ),
        arrival=1700000000.25,
        client=ClientInfo("192.0.2.1", 25, "mx.example", "ESMTPS", "user", "submission"),
    )


def test_encoding_is_versioned_and_certifier_is_base64() -> None:
    doc = json.loads(encode_envelope(_sample()))
    assert doc["v"] == CODEC_VERSION
    assert doc["params"]["mtrk"]["certifier"] == "AAECAwQFBgcICQoLDA0ODxAREhM="
    assert doc["recipients"][1]["notify"] == ["DELAY", "SUCCESS"]


def _mutated(path: tuple[str | int, ...], value: object) -> bytes:
    doc = json.loads(encode_envelope(_sample()))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("v",), CODEC_VERSION + 1),
        (("v",), "1"),
        (("sender",), None),
        (("arrival",), "now"),
        (("arrival",), True),
        (("recipients",), {}),
        (("recipients", 0, "notify"), "SUCCESS"),
        (("params", "size"), True),
        (("params", "size"), 1.5),
        (("params", "smtputf8"), 0),
        (("params", "mtrk", "certifier"), "not base64!"),
        (("params", "mtrk", "certifier"), "é"),
        (("client", "port"), "25"),
        (("client", "extra"), 1),
    ],
)
def test_malformed_documents_are_rejected(path: tuple[str | int, ...], value: object) -> None:
    with pytest.raises(CodecError):
        decode_envelope(_mutated(path, value))


def test_received_xtext_is_kept_and_written_only_when_there_is_one() -> None:
    # RFC 3461 §5.2.1(a)/(d): the relay needs the ENVID and ORCPT esmtp-values as
    # received, so the spool keeps them; the keys are absent when there is none.
    sample = _sample()
    orcpt = OriginalRecipient("rfc822", "xAt@dsn.test", "x+41t@dsn.test")
    envelope = Envelope(
        sample.queue_id,
        sample.sender,
        (sample.recipients[0], Recipient("c@example.org", RcptParams(orcpt=orcpt))),
        MailParams(envid="abAcd+ef-x", envid_xtext="ab+41cd+2Bef-x"),
        sample.arrival,
        sample.client,
    )
    doc = json.loads(encode_envelope(envelope))
    assert doc["params"]["envid_xtext"] == "ab+41cd+2Bef-x"
    assert doc["recipients"][1]["orcpt"]["xtext"] == "x+41t@dsn.test"
    decoded = decode_envelope(encode_envelope(envelope))
    assert decoded.params.envid_xtext == "ab+41cd+2Bef-x"
    assert decoded.recipients[1].params.orcpt == orcpt
    plain = json.loads(encode_envelope(sample))
    assert "envid_xtext" not in plain["params"]
    assert "xtext" not in plain["recipients"][1]["orcpt"]
    # The optional keys are typed like the others, and nothing else is let in.
    for path, value in [
        (("params", "envid_xtext"), 5),
        (("recipients", 1, "orcpt", "xtext"), ["x"]),
        (("recipients", 1, "orcpt", "extra"), "x"),
    ]:
        with pytest.raises(CodecError):
            decode_envelope(_mutated(path, value))


# An envelope as the codec wrote it before the received xtext was kept.
OLD_FILE = (
    b'{"v":1,"queue_id":"0abc","sender":"a@example.org","recipients":['
    b'{"address":"c@example.org","notify":["SUCCESS"],'
    b'"orcpt":{"type":"rfc822","address":"c+x@x"}}],'
    b'"params":{"size":null,"body":null,"envid":"E+1","ret":"HDRS","mtrk":null,'
    b'"smtputf8":false,"auth":null},"arrival":1700000000.25,'
    b'"client":{"address":"192.0.2.1","port":25,"helo":"mx.example","protocol":"ESMTP",'
    b'"authenticated_as":null,"listener":"smtp"}}'
)


def test_a_spool_file_without_the_xtext_keys_still_decodes() -> None:
    envelope = decode_envelope(OLD_FILE)
    assert (envelope.params.envid, envelope.params.envid_xtext) == ("E+1", None)
    orcpt = envelope.recipients[0].params.orcpt
    assert orcpt == OriginalRecipient("rfc822", "c+x@x", None) and orcpt.xtext is None
    assert encode_envelope(envelope) == OLD_FILE  # read and written back: the same bytes


def test_missing_key_is_rejected() -> None:
    doc = json.loads(encode_envelope(_sample()))
    del doc["client"]["helo"]
    with pytest.raises(CodecError):
        decode_envelope(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"\xff", b"[1]", b"{", encode_envelope(_sample())[:-1]])
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_envelope(data)


def test_non_finite_arrival_cannot_be_encoded() -> None:
    with pytest.raises(CodecError):
        encode_envelope(Envelope("q", "", (), arrival=float("nan")))
