"""The design's rendering rules written out independently of the service, to compute expected output."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Values the format and value tests share, with their renderings worked out by hand.
NAN, INF = float("nan"), float("inf")
OID = ObjectId("65a1b2c3d4e5f60718293a4b")
UUID = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
UUID_B64 = "D4+tW9nLRp+hZXCGdyiVDg=="


def lookup(doc: dict[str, Any], path: str) -> Any:
    """A dotted path through documents and array indexes; None when it does not resolve."""
    value: Any = doc
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def csv_text(value: Any) -> str:
    """A CSV cell for the types generated tasks hold."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_START) else value
    if isinstance(value, datetime):
        value = value.astimezone(timezone.utc)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)
