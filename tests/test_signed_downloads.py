"""Downloads without long-lived secrets in URLs: short-lived signed links bound to the job and its owner,
and API tokens only in the Authorization header."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from service import signing
from service.app import create_app
from service.settings import MANAGER_KEY, SETTINGS_KEY

from conftest import make_settings, wait_status

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
SPEC = {"collection": "tasks", "format": "csv", "fields": ["seq"], "sort": {"seq": 1}, "limit": 5}


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {**dict(parse_qsl(parts.query)), **changes}
    return f"{parts.path}?{urlencode(query)}"


async def completed_job(aiohttp_client: Any, mongo_url: str, tmp_path: Path, **settings: Any) -> tuple[Any, dict[str, Any]]:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, api_tokens=TOKENS, **settings)))
    job = await (await api.post("/api/exports", json=SPEC, headers=ALICE)).json()
    return api, await wait_status(api, job["id"], headers=ALICE)


async def test_the_signed_link_downloads_without_a_token_and_nothing_else_does(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    api, done = await completed_job(aiohttp_client, mongo_url, tmp_path)
    assert done["status"] == "completed", done
    url = done["download_url"]
    query = dict(parse_qsl(urlsplit(url).query))
    assert set(query) == {"exp", "sig"} and "token" not in url

    resp = await api.get(url)  # no Authorization header: the signature is the credential
    assert resp.status == 200
    rows = list(csv.reader(io.StringIO((await resp.read()).decode())))
    assert rows == [["seq"], *[[str(n)] for n in range(5)]]
    assert (await api.head(url)).status == 200

    refused = {
        "tampered signature": with_query(url, sig=query["sig"][:-2] + ("AA" if not query["sig"].endswith("AA") else "BB")),
        "longer life": with_query(url, exp=str(int(query["exp"]) + 3600)),
        "no expiry": with_query(url, exp=""),
    }
    for why, bad in refused.items():
        resp = await api.get(bad)
        body = await resp.json()
        assert resp.status == 403 and body["error"]["code"] == "invalid_signature", (why, body)
    other_job = await (await api.post("/api/exports", json=SPEC, headers=ALICE)).json()
    resp = await api.get(url.replace(done["id"], other_job["id"]))  # another job of the same owner
    assert resp.status == 403
    # Bob's signed link would not be Alice's: the owner is part of what is signed.
    bobs = await (await api.post("/api/exports", json=SPEC, headers=BOB)).json()
    bobs = await wait_status(api, bobs["id"], headers=BOB)
    resp = await api.get(bobs["download_url"].replace(bobs["id"], done["id"]))
    assert resp.status == 403

    # Without a signature the bearer header still works, for its owner only; a token in the query never.
    assert (await api.get(f"/api/exports/{done['id']}/download", headers=ALICE)).status == 200
    assert (await api.get(f"/api/exports/{done['id']}/download", headers=BOB)).status == 404
    for path in (f"/api/exports/{done['id']}/download?token=alice-token", "/api/exports?token=alice-token"):
        resp = await api.get(path)
        assert resp.status == 401 and (await resp.json())["error"]["field"] == "Authorization", path
    # A signature opens the download route only, not every path that ends like it.
    for path in ("/api/exports/download?sig=x", f"/api/exports/{done['id']}%2Fdownload?sig=x"):
        resp = await api.get(path)
        assert resp.status == 401 and (await resp.json())["error"]["field"] == "Authorization", path


async def test_an_expired_link_is_refused_and_the_snapshot_gives_a_fresh_one(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, done = await completed_job(aiohttp_client, mongo_url, tmp_path, download_url_seconds=1)
    later = time.time() + 3  # the link's life, in whole seconds, is over: the signing clock says so
    monkeypatch.setattr(signing, "time", SimpleNamespace(time=lambda: later))
    resp = await api.get(done["download_url"])
    body = await resp.json()
    assert resp.status == 403 and body["error"]["code"] == "link_expired" and body["error"]["field"] == "exp", body
    fresh = await (await api.get(f"/api/exports/{done['id']}", headers=ALICE)).json()
    assert fresh["download_url"] != done["download_url"]
    assert (await api.get(fresh["download_url"])).status == 200


async def test_two_instances_sharing_the_export_dir_accept_each_others_links(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    api, done = await completed_job(aiohttp_client, mongo_url, tmp_path)
    first = api.server.app[SETTINGS_KEY]
    # Another instance: same jobs and export directory, no EXPORT_SECRET_KEY: the key file there is shared.
    other = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, api_tokens=TOKENS, jobs_collection=first.jobs_collection)))
    assert other.server.app[MANAGER_KEY].instance_id != api.server.app[MANAGER_KEY].instance_id
    assert (await other.get(done["download_url"])).status == 200
    # A configured secret is used instead; links signed with another key are refused.
    keyed = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, api_tokens=TOKENS, jobs_collection=first.jobs_collection, secret_key="s3cret")))
    assert (await keyed.get(done["download_url"])).status == 403
    fresh = await (await keyed.get(f"/api/exports/{done['id']}", headers=ALICE)).json()
    assert (await keyed.get(fresh["download_url"])).status == 200
