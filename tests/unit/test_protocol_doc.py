"""docs/protocol.md is normative: its field tables must say what the code and the schemas do.

Every message's table is read back and compared with its dataclass and its generated schema:
field names and order, types, required (client) or always sent (server), defaults, integer
ranges, enums, the id pattern, string lengths, map keys; and section 7 lists every error code.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from schemas import jsonschema as J
from schemas import protocol as P
from schemas.streams import CHANNELS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TYPES = {"int": "integer", "string": "string", "bool": "boolean", "object string→int": "object",
         "object string→number": "object", "array of string": "array"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def doc_tables() -> dict[str, tuple[list[str], list[list[str]]]]:
    """message type -> (header, rows) of the first field table after its bold heading."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    current = None
    lines = DOC.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\*\*`(\w+)`\*\*", lines[i])
        if m:
            current = m.group(1)
        elif lines[i].startswith("| field | type |") and current and current not in tables:
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables[current] = (header, rows)
            continue
        i += 1
    return tables


ALL = [("client", c) for c in P.CLIENT_MESSAGES.values()] + [
    ("server", c) for c in P.SERVER_MESSAGES.values()]


def _range(cell: str) -> tuple[int, int] | None:
    m = re.search(r"(?<![\w.])(\d+)\.\.(\d+)", cell)
    return (int(m.group(1)), int(m.group(2))) if m else None


@pytest.mark.parametrize("direction,cls", ALL, ids=[f"{d}.{c.TYPE}" for d, c in ALL])
def test_field_table_matches_code_and_schema(direction, cls):
    tables = doc_tables()
    assert cls.TYPE in tables, f"docs/protocol.md has no field table for {cls.TYPE}"
    header, rows = tables[cls.TYPE]
    schema = J.message_schema(cls, direction)
    col = {name: i for i, name in enumerate(header)}
    assert ("required" if direction == "client" else "always sent") in col, header
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in fields(cls)]
    for f, row in zip(fields(cls), rows, strict=True):
        prop = schema["properties"][f.name]
        where = f"{cls.TYPE}.{f.name}"
        jt = prop["type"] if isinstance(prop["type"], str) else prop["type"][0]
        assert TYPES[row[col["type"]]] == jt, where
        flag = row[col["required" if direction == "client" else "always sent"]]
        assert flag in ("yes", "no"), where
        assert (flag == "yes") == (f.name in schema["required"]), where
        if direction == "client":
            _check_default(f, row[col["default"]], flag == "yes", where)
        _check_values(f, prop, row[col["values"]], where)


def _check_default(f, cell: str, required: bool, where: str) -> None:
    default = f.default if f.default is not MISSING else f.default_factory()
    if required or default is None:
        assert cell == "—", where
    else:
        assert cell.startswith("`") and json.loads(cell.strip("`")) == default, where


def _check_values(f, prop: dict, cell: str, where: str) -> None:
    meta = f.metadata
    want = (meta.get("minimum"), meta.get("maximum"))
    if "keys" in meta:  # an object: its keys and the range of its values
        assert re.findall(r'"(\w+)"', cell) == list(meta["keys"]), where
        assert _range(cell) == (meta["values_minimum"], meta["values_maximum"]), where
        return
    if want != (None, None):
        assert _range(cell) == want, where
    else:
        assert _range(cell) is None, where
    if "enum" in meta and f.name != "code":
        assert re.findall(r'"([\w.-]+)"', cell) == list(meta["enum"]), where
    if "pattern" in meta:
        assert cell == "id", where
    elif "max_length" in meta:
        assert cell == f"≤ {meta['max_length']} chars", where
    if not meta or set(meta) <= {"required"}:
        assert cell == "—", where
    for key in ("minimum", "maximum", "pattern", "maxLength", "enum"):
        assert (key in prop) == (key in _schema_keys(meta)), (where, key)


def _schema_keys(meta) -> set[str]:
    names = {"minimum": "minimum", "maximum": "maximum", "pattern": "pattern",
             "max_length": "maxLength", "enum": "enum"}
    return {names[k] for k in meta if k in names}


def test_error_code_table_is_exactly_the_codes():
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 7. Errors"):text.index("## 8.")]
    codes = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert sorted(codes) == list(P.ERROR_CODES)
    assert J.message_schema(P.ErrorEvent, "server")["properties"]["code"]["enum"] == list(
        P.ERROR_CODES)


def test_resume_channels_are_the_stream_channels():
    meta = next(f for f in fields(P.Resume) if f.name == "last").metadata
    assert tuple(meta["keys"]) == tuple(CHANNELS)


def test_doc_states_the_protocol_version_and_json_depth():
    text = DOC.read_text(encoding="utf-8")
    assert text.startswith(f"# Parley WebSocket protocol, version {P.PROTOCOL_VERSION}\n")
    assert f"deeper than {P.MAX_JSON_DEPTH}" in text
    assert str(P.MAX_SAFE_INT) in text and "2^53 − 1" in text


def test_every_server_optional_field_is_never_null_in_the_schema():
    for cls in P.SERVER_MESSAGES.values():
        for name, prop in J.message_schema(cls, "server")["properties"].items():
            assert not isinstance(prop.get("type"), list), (cls.TYPE, name)
