"""The README's error code tables against the code: every code the service can answer with or end a job with is
listed there, and every code listed there is one the service has, so neither side goes stale unnoticed."""
from __future__ import annotations

import ast
import inspect
import re
from http import HTTPStatus
from pathlib import Path

from aiohttp import web

from service import api, query

ROOT = Path(__file__).resolve().parent.parent
CODE = re.compile(r"[a-z]+(?:_[a-z]+)*")
# Where the code is among each call's arguments (or its `code=` keyword): the errors that carry a code, the
# helpers that pass one on.
CODE_ARGUMENT = {
    "ValidationError": 2, "UnsupportedMediaType": 2, "JobConflict": 2, "error_response": 1, "SignatureError": 0,
    "EncoderError": 0, "_fail": 1, "_from_extended_json": 2, "_check_operators": 4,
}
# Codes that never reach a client: a checkpoint's file gone makes the run start again from its first row.
NEVER_ANSWERED = {"checkpoint_gone"}
# Codes aiohttp makes from its own answers' reasons (api.py: exc.reason.lower().replace(" ", "_")), for requests
# no handler takes: an unknown /api/ path, a method the path does not have.
FROM_AIOHTTP = {"method_not_allowed", "not_found"}


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _code_argument(call: ast.Call) -> ast.expr | None:
    callee = _callee(call) or ""
    index = CODE_ARGUMENT.get(callee)
    if index is None:
        return None
    if len(call.args) > index:
        return call.args[index]
    given = next((keyword.value for keyword in call.keywords if keyword.arg == "code"), None)
    if given is None and callee in ("ValidationError", "UnsupportedMediaType"):  # without one, the default code
        return ast.Constant(inspect.signature(query.ValidationError).parameters["code"].default)
    return given


def _strings(node: ast.AST) -> set[str]:
    """The string literals in node (a conditional such as `exc.code or ("expired" if ... else "not_ready")`)."""
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _http_exception_code(call: ast.Call) -> set[str]:
    """web.HTTPRequestTimeout() and the like, raised in a handler: the API answers with a code made from its reason."""
    name = _callee(call) or ""
    exception = getattr(web, name, None) if name.startswith("HTTP") else None
    if not (isinstance(exception, type) and issubclass(exception, web.HTTPException)) or exception.status_code < 400:
        return set()
    return {HTTPStatus(exception.status_code).phrase.lower().replace(" ", "_")}


def _codes_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Call):
        argument = _code_argument(node)
        return _strings(argument) if argument is not None else _http_exception_code(node)
    if isinstance(node, ast.Dict):  # {"code": "internal_error", ...}
        return {value.value for key, value in zip(node.keys, node.values)
                if isinstance(key, ast.Constant) and key.value == "code" and isinstance(value, ast.Constant)}
    if isinstance(node, ast.ClassDef):  # a class's code: DatabaseError.code = "database_error"
        return {code for item in node.body if isinstance(item, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "code" for t in item.targets) for code in _strings(item.value)}
    if isinstance(node, ast.Tuple) and len(node.elts) > 1 and all(isinstance(e, ast.Constant) for e in node.elts[:2]):
        first, second = node.elts[0], node.elts[1]
        return {second.value} if first.value == "error" else set()  # the encoder's ("error", code, message) reply
    return set()


def codes_in_source() -> dict[str, list[str]]:
    """Each code string in service/, with where it is."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for code in _codes_in(node):
                if isinstance(code, str) and CODE.fullmatch(code):
                    found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    return found


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n### {title}\n")
    end = readme.find("\n## ", start + 1)
    following = readme.find("\n### ", start + 1)
    return readme[start:min(i for i in (end, following) if i != -1)]


def table_codes(section: str) -> set[str]:
    """The backquoted codes in the `code` column of each table in section."""
    codes: set[str] = set()
    column = None
    for line in section.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if column is None:
            column = cells.index("code")
        elif not set(cells[0]) <= set("-:"):
            codes.update(re.findall(r"`([a-z_]+)`", cells[column]))
    return codes


SAMPLE = """
class Gone(RuntimeError):
    code = "a_class_code"

def handler(exc, run):
    raise ValidationError("field", "message", "a_validation_code")
    raise ValidationError("field", "message")
    raise JobConflict("message", "completed", code="a_conflict_code")
    error_response(409, exc.code or ("a_default_code" if exc.status else "another_default_code"), "message")
    answer = {"error": {"code": "a_dict_code", "message": "m"}}
    reply = ("error", "an_encoder_code", "message")
    _fail(run, "a_failure_code", "message")
    raise web.HTTPRequestTimeout()
    raise web.HTTPFound("/")
    code = answer.get("code")
    name = " ".replace(" ", "_")
"""


def test_the_extraction_finds_codes_of_every_kind() -> None:
    found = {code for node in ast.walk(ast.parse(SAMPLE)) for code in _codes_in(node)}
    assert found == {
        "a_class_code", "a_validation_code", "invalid_request", "a_conflict_code", "a_default_code", "another_default_code",
        "a_dict_code", "an_encoder_code", "a_failure_code", "request_timeout",
    }


def test_every_code_in_the_service_is_in_the_readme_tables() -> None:
    documented = table_codes(readme_section("Error codes"))
    missing = {code: where for code, where in codes_in_source().items() if code not in documented | NEVER_ANSWERED}
    assert not missing, f"codes the service uses that README.md's Error codes tables do not list: {missing}"


def test_every_code_in_the_readme_tables_is_one_the_service_has() -> None:
    documented = table_codes(readme_section("Error codes"))
    stale = documented - set(codes_in_source()) - FROM_AIOHTTP
    assert not stale, f"README.md's Error codes tables list codes the service never uses: {sorted(stale)}"


def test_the_job_failure_codes_are_listed_where_the_job_states_are() -> None:
    failures = table_codes(readme_section("Error codes").split("#### Job failure codes", 1)[1])
    assert {"collection_not_exportable", "invalid_collection", "timeout", "too_many_attempts"} <= failures
    states = readme_section("Job snapshot")
    listed = set(re.findall(r"`([a-z_]+)`", states[states.index("Failure codes"):]))
    assert failures <= listed, f"the Job snapshot's failure codes lack {sorted(failures - listed)}"


def test_the_limits_in_the_table_are_the_code_s() -> None:
    section = readme_section("Error codes")
    assert f"more than {query.MAX_FIELDS:,} fields" in section
    assert f"more than {query.MAX_SORT_KEYS} keys" in section
    assert f"more than {query.MAX_STAGES} stages" in section
    assert f"over {query.MAX_BODY_BYTES // 1024} KiB" in section
    assert f"nested deeper than {query.MAX_DEPTH} levels" in section
    assert f"from 1 to {api.LIST_LIMIT_MAX}" in section
    assert f"did not arrive whole within {api.BODY_SECONDS:g} s" in section
    assert f"outside {query.ROW_GROUP_MIN:,}–{query.ROW_GROUP_MAX:,}" in section
