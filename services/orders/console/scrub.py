"""Text as a console page may show it: card data redacted, secrets hidden."""

from __future__ import annotations

import json
import re
from typing import Any

from schemas.carddata import redact

#: keys whose values a page never shows, at any depth of a payload (card data is
#: redacted by ``schemas.carddata.redact`` before this)
_SECRET_KEY = re.compile(r"secret|password|token|authorization", re.IGNORECASE)


def scrub(value: bytes | str) -> str:
    """A payload or header as a page may show it: card data redacted, secrets hidden."""
    text_ = redact(value.decode("utf-8", "replace") if isinstance(value, bytes) else value).text
    try:
        doc = json.loads(text_)
    except ValueError:
        return text_
    return json.dumps(hide_secrets(doc), indent=2, ensure_ascii=False)


def hide_secrets(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {
            k: "[hidden]" if _SECRET_KEY.search(str(k)) else hide_secrets(v) for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [hide_secrets(v) for v in doc]
    return doc
