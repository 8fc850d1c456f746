"""Pure, versioned JSON serialisation of an Envelope for the spool, and its strict decoder."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

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

CODEC_VERSION = 1

T = TypeVar("T")


class CodecError(ValueError):
    """The bytes are not a well-formed envelope of a known codec version."""


def encode_envelope(envelope: Envelope) -> bytes:
    """Serialise ``envelope`` to compact ASCII JSON (lone surrogates survive as escapes)."""
    if not math.isfinite(envelope.arrival):
        raise CodecError(f"arrival time is not finite: {envelope.arrival!r}")
    doc = {
        "v": CODEC_VERSION,
        "queue_id": envelope.queue_id,
        "sender": envelope.sender,
        "recipients": [_encode_recipient(r) for r in envelope.recipients],
        "params": _encode_mail_params(envelope.params),
        "arrival": envelope.arrival,
        "client": _encode_client(envelope.client),
    }
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode(
        "ascii"
    )


def decode_envelope(data: bytes) -> Envelope:
    """Rebuild the Envelope written by ``encode_envelope``; raise CodecError on any defect."""
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CodecError(f"not an ASCII JSON document: {e}") from e
    obj = _object(
        doc, "envelope", {"v", "queue_id", "sender", "recipients", "params", "arrival", "client"}
    )
    version = _typed(obj["v"], int, "v")
    if version != CODEC_VERSION:
        raise CodecError(f"unsupported envelope codec version {version!r}")
    recipients = _typed(obj["recipients"], list, "recipients")
    arrival = obj["arrival"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)):
        raise CodecError("arrival: expected a number")
    return Envelope(
        queue_id=_typed(obj["queue_id"], str, "queue_id"),
        sender=_typed(obj["sender"], str, "sender"),
        recipients=tuple(_decode_recipient(r) for r in recipients),
        params=_decode_mail_params(obj["params"]),
        arrival=float(arrival),
        client=_decode_client(obj["client"]),
    )


def _encode_recipient(recipient: Recipient) -> dict[str, Any]:
    notify = recipient.params.notify
    orcpt = recipient.params.orcpt
    return {
        "address": recipient.address,
        "notify": None if notify is None else sorted(notify),
        "orcpt": None if orcpt is None else _encode_orcpt(orcpt),
    }


def _encode_orcpt(orcpt: OriginalRecipient) -> dict[str, Any]:
    doc = {"type": orcpt.addr_type, "address": orcpt.address}
    if orcpt.xtext is not None:  # optional: older files have no such key
        doc["xtext"] = orcpt.xtext
    return doc


def _decode_recipient(value: object) -> Recipient:
    obj = _object(value, "recipient", {"address", "notify", "orcpt"})
    notify_list = _optional(obj["notify"], list, "notify")
    notify = None
    if notify_list is not None:
        notify = frozenset(_typed(k, str, "notify keyword") for k in notify_list)
    orcpt = None
    if obj["orcpt"] is not None:
        o = _object(obj["orcpt"], "orcpt", {"type", "address"}, optional={"xtext"})
        orcpt = OriginalRecipient(
            _typed(o["type"], str, "orcpt type"),
            _typed(o["address"], str, "orcpt address"),
            _optional(o.get("xtext"), str, "orcpt xtext"),
        )
    return Recipient(
        address=_typed(obj["address"], str, "address"),
        params=RcptParams(notify=notify, orcpt=orcpt),
    )


def _encode_mail_params(params: MailParams) -> dict[str, Any]:
    mtrk = params.mtrk
    doc: dict[str, Any] = {
        "size": params.size,
        "body": params.body,
        "envid": params.envid,
        "ret": params.ret,
        "mtrk": None
        if mtrk is None
        else {
            "certifier": base64.b64encode(mtrk.certifier).decode("ascii"),
            "timeout": mtrk.timeout,
        },
        "smtputf8": params.smtputf8,
        "auth": params.auth,
    }
    if params.envid_xtext is not None:  # optional: older files have no such key
        doc["envid_xtext"] = params.envid_xtext
    if params.deliver_by is not None:  # optional: older files have no such key (RFC 2852 BY=)
        by = params.deliver_by
        doc["deliver_by"] = {"seconds": by.seconds, "mode": by.mode, "trace": by.trace}
    return doc


def _decode_mail_params(value: object) -> MailParams:
    obj = _object(
        value,
        "params",
        {"size", "body", "envid", "ret", "mtrk", "smtputf8", "auth"},
        optional={"envid_xtext", "deliver_by"},
    )
    deliver_by = None
    if obj.get("deliver_by") is not None:
        b = _object(obj["deliver_by"], "deliver_by", {"seconds", "mode", "trace"})
        mode = _typed(b["mode"], str, "deliver_by mode")
        if mode not in ("N", "R"):
            raise CodecError(f"deliver_by mode: expected N or R, got {mode!r}")
        deliver_by = DeliverBy(
            seconds=_typed(b["seconds"], int, "deliver_by seconds"),
            mode=mode,
            trace=_typed(b["trace"], bool, "deliver_by trace"),
        )
    mtrk = None
    if obj["mtrk"] is not None:
        m = _object(obj["mtrk"], "mtrk", {"certifier", "timeout"})
        certifier_b64 = _typed(m["certifier"], str, "mtrk certifier")
        try:
            certifier = base64.b64decode(certifier_b64.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as e:
            raise CodecError(f"mtrk certifier: bad base64: {e}") from e
        mtrk = Mtrk(certifier=certifier, timeout=_optional(m["timeout"], int, "mtrk timeout"))
    return MailParams(
        size=_optional(obj["size"], int, "size"),
        body=_optional(obj["body"], str, "body"),
        envid=_optional(obj["envid"], str, "envid"),
        ret=_optional(obj["ret"], str, "ret"),
        mtrk=mtrk,
        smtputf8=_typed(obj["smtputf8"], bool, "smtputf8"),
        auth=_optional(obj["auth"], str, "auth"),
        envid_xtext=_optional(obj.get("envid_xtext"), str, "envid_xtext"),
        deliver_by=deliver_by,
    )


def _encode_client(client: ClientInfo) -> dict[str, Any]:
    return {
        "address": client.address,
        "port": client.port,
        "helo": client.helo,
        "protocol": client.protocol,
        "authenticated_as": client.authenticated_as,
        "listener": client.listener,
    }


def _decode_client(value: object) -> ClientInfo:
    obj = _object(
        value, "client", {"address", "port", "helo", "protocol", "authenticated_as", "listener"}
    )
    return ClientInfo(
        address=_typed(obj["address"], str, "client address"),
        port=_typed(obj["port"], int, "client port"),
        helo=_typed(obj["helo"], str, "client helo"),
        protocol=_typed(obj["protocol"], str, "client protocol"),
        authenticated_as=_optional(obj["authenticated_as"], str, "client authenticated_as"),
        listener=_typed(obj["listener"], str, "client listener"),
    )


def _object(
    value: object, what: str, keys: set[str], optional: set[str] | None = None
) -> Mapping[str, object]:
    """``value`` as a JSON object with exactly ``keys``, plus any of ``optional``."""
    if not isinstance(value, dict):
        raise CodecError(f"{what}: expected an object")
    extra = value.keys() - keys
    if not keys <= value.keys() or not extra <= (optional or set()):
        expected = sorted(keys) + [f"{k}?" for k in sorted(optional or ())]
        raise CodecError(f"{what}: expected keys {expected}, got {sorted(value)}")
    return value


def _typed(value: object, kind: type[T], what: str) -> T:
    """``value`` if it is a ``kind`` (a bool is never accepted as an int)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _optional(value: object, kind: type[T], what: str) -> T | None:
    """``value`` if it is None or a ``kind``."""
    return None if value is None else _typed(value, kind, what)
