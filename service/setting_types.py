"""The types a setting can have: each reads environment text and accepts a Python value the same way."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri


class Invalid(ValueError):
    """A value a setting cannot take; the message reads on from the setting's name ("must be ..., got ...")."""


@dataclass(frozen=True)
class Kind:
    """One type of setting: environment text to value, a Python value to the stored value, and its README word."""

    word: str
    from_text: Callable[[str], Any]
    from_value: Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be text, got {value!r}")
    return value


def _int_text(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise Invalid(f"must be an integer, got {raw!r}") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # True is an int to Python, not to a reader
        raise Invalid(f"must be an integer, got {value!r}")
    return value


def _finite(value: float, given: Any) -> float:
    if not math.isfinite(value):  # no limit or interval is infinite: int(inf * 1000) fails at its first use
        raise Invalid(f"must be a finite number, got {given!r}")
    return value


def _number_text(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise Invalid(f"must be a number, got {raw!r}") from None
    return _finite(value, raw)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"must be a number, got {value!r}")
    return _finite(float(value), value)


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise Invalid(f"must be a path, got {value!r}")
    return Path(value)


def _items(raw: str) -> list[str]:
    return [item for item in (part.strip() for part in raw.split(",")) if item]


def _strings(value: Any, what: str) -> list[str]:
    """Every item of a list or tuple of non-empty strings; a bare string would be split into letters."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise Invalid(f"must be a list of {what}, got {value!r}")
    items = list(value)
    if not all(isinstance(item, str) and item for item in items):
        raise Invalid(f"must be a list of non-empty {what}, got {value!r}")
    return items


_TOKENS_SHAPE = "must look like token:user,token2:user2"


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _tokens_text(raw: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    entry_of: dict[str, int] = {}
    for number, item in enumerate(_items(raw), 1):
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            raise Invalid(_TOKENS_SHAPE)  # never echoes the text: it holds secrets
        if token in entry_of:  # which user would it be? Kept silently, the last one would win.
            raise Invalid(f"repeats a token: the {_ordinal(number)} entry has the token of the {_ordinal(entry_of[token])}")
        tokens[token] = user
        entry_of[token] = number
    return tokens


def _tokens(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise Invalid("must map tokens to users")
    pairs = list(value.items())
    if not all(isinstance(item, str) and item for pair in pairs for item in pair):
        raise Invalid("must map non-empty token strings to non-empty user strings")
    return dict(pairs)


def _host_name(item: str) -> str:
    """A host name as a Host header names it, without the port, lower-cased."""
    name = item.lower()
    if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name):  # "_" as in container names (export_app)
        raise Invalid(f"must be host names such as exports.example.com (no scheme, port or path), got {item!r}")
    return name


def _origin(item: str) -> str:
    """An origin as browsers send it (scheme://host[:port], no path), lower-cased, or "*"."""
    if item == "*":
        return item
    parts = urlsplit(item)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise Invalid(f"must list origins like https://app.example.com:8443, got {item!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _mongo_url(value: Any) -> str:
    url = _text(value)
    scheme = url.partition("://")[0]
    if scheme not in ("mongodb", "mongodb+srv"):  # the text itself is never echoed: it may hold a password
        raise Invalid("must be a MongoDB connection string (mongodb://... or mongodb+srv://...)")
    if scheme == "mongodb":  # an SRV string needs a DNS lookup, which the driver makes when it connects
        try:
            parse_uri(url)
        except (InvalidURI, ConfigurationError, ValueError) as exc:
            raise Invalid(f"is not a valid connection string: {exc}") from None
    return url


_DB_NAME_FORBIDDEN = set('/\\. "$\x00')


def _db_name(value: Any) -> str:
    name = _text(value)
    if not name or len(name.encode()) > 63 or _DB_NAME_FORBIDDEN & set(name):
        raise Invalid(f'must be a MongoDB database name (1-63 bytes, none of / \\ . " $ or a space), got {name!r}')
    return name


def _collection_name(value: Any) -> str:
    name = _text(value)
    if not name or "$" in name or "\x00" in name or name.startswith(("system.", ".")) or name.endswith("."):
        raise Invalid(f"must be a MongoDB collection name (no $, not system.*), got {name!r}")
    return name


def _redis_url(value: Any) -> str:
    url = _text(value)
    if url.partition("://")[0] not in ("redis", "rediss", "unix"):
        raise Invalid("must be a Redis URL (redis://, rediss:// or unix://)")
    if find_spec("redis") is None:  # python-socketio would start without it and drop every event
        raise Invalid("needs the redis package: pip install 'mongo-export-service[redis]'")
    return url


TEXT = Kind("text", _text, _text)
MONGO_URL = Kind("connection string", _mongo_url, _mongo_url)
DB_NAME = Kind("database name", _db_name, _db_name)
COLLECTION_NAME = Kind("collection name", _collection_name, _collection_name)
REDIS_URL = Kind("Redis URL", _redis_url, _redis_url)
INTEGER = Kind("integer", _int_text, _int)
NUMBER = Kind("number", _number_text, _number)
PATH = Kind("path", Path, _path)
TOKENS = Kind("`token:user` list", _tokens_text, _tokens)
NAMES = Kind("name list", lambda raw: tuple(_items(raw)), lambda value: tuple(_strings(value, "names")))
HOSTS = Kind(
    "host name list",
    lambda raw: tuple(_host_name(item) for item in _items(raw)),
    lambda value: tuple(_host_name(item) for item in _strings(value, "host names")),
)
ORIGINS = Kind(
    "origin list",
    lambda raw: tuple(_origin(item) for item in _items(raw)),
    lambda value: tuple(_origin(item) for item in _strings(value, "origins")),
)
