"""The twistd plugin: `twistd -n mtrkmta [options]` runs one mtrkmta node."""

from twisted.application.service import ServiceMaker

mtrkmta = ServiceMaker(
    "mtrkmta",
    "mtrkmta.tap",
    "Mail transfer agent with IETF Message Tracking (MTRK, MTQP)",
    "mtrkmta",
)
