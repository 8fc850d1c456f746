"""A followed trace (mtrkmta.mtqp.client.Trace) as data: what `mtrkmta track --json` prints
and the HTTP tracking API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mtrkmta.mtqp.client import Hop, Trace
from mtrkmta.smtp.statuscodes import meaning
from mtrkmta.tracking.status import RecipientStatus


def _date_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _status_json(status: RecipientStatus) -> dict[str, Any]:
    return {
        "original_recipient": str(status.original_recipient),
        "final_recipient": str(status.final_recipient),
        "action": status.action.lower(),
        "status": status.status,
        "meaning": meaning(status.status),
        "remote_mta": None if status.remote_mta is None else str(status.remote_mta),
        "last_attempt_date": _date_json(status.last_attempt_date),
        "will_retry_until": _date_json(status.will_retry_until),
        "extensions": [list(extension) for extension in status.extensions],
    }


def _hop_json(hop: Hop) -> dict[str, Any]:
    outcome = "answered" if hop.reports else ("refused" if hop.refused else "error")
    return {
        "host": hop.host,
        "referred_by": hop.referred_by,
        "server": None
        if hop.server is None
        else {"address": hop.server.address, "port": hop.server.port, "name": hop.server.name},
        "tls": hop.tls,
        "outcome": outcome,
        "reply": None if hop.response is None else hop.response.status_line().decode("ascii"),
        "error": hop.error,
        "reports": [
            {
                "original_envelope_id": report.original_envelope_id,
                "reporting_mta": str(report.reporting_mta),
                "arrival_date": _date_json(report.arrival_date),
                "recipients": [_status_json(status) for status in report.recipients],
            }
            for report in hop.reports
        ],
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    """The trace as JSON-able data: hops with their reports, and each recipient's path."""
    return {
        "envid": trace.envid,
        "complete": trace.complete,
        "hops": [_hop_json(hop) for hop in trace.hops],
        "recipients": [
            {
                "original_recipient": path.original_recipient,
                "outcome": path.outcome,
                "final": path.final,
                "reason": path.reason,
                "path": [
                    {
                        "hop": step.hop + 1,
                        "reporting_mta": step.reporting_mta,
                        "action": step.status.action.lower(),
                        "status": step.status.status,
                        "meaning": meaning(step.status.status),
                    }
                    for step in path.steps
                ],
            }
            for path in trace.recipients
        ],
    }
