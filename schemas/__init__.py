"""Pydantic models of every paysaga event: the single source of truth for payloads.

Import models from `schemas.contract` (docs/contract.md) and `schemas.events` (internal
saga events); the envelope helpers and the registry are re-exported here.
"""

from schemas.envelope import Envelope, dump, new_envelope
from schemas.events import EVENT_TYPES, parse_event, parse_payload

__all__ = ["EVENT_TYPES", "Envelope", "dump", "new_envelope", "parse_event", "parse_payload"]
