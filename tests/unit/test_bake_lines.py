"""The bake lines file: parsing, ids, errors that name the row; the bake Redis choice."""

from __future__ import annotations

import json

import pytest

from core.config import Config
from workers.bake.lines import Line, LinesError, baked, default_id, parse_lines
from workers.bake.queue import BakeConfigError, bake_url, job_id

NPCS = {"guard", "merchant"}


def test_columns_in_any_order_ids_optional_and_stable():
    lines = parse_lines('line,npc,id\n"Halt, stranger.",guard,halt\nFine wares!,merchant,\n\n',
                        NPCS)
    assert [(ln.npc, ln.text, ln.id, ln.row) for ln in lines] == [
        ("guard", "Halt, stranger.", "halt", 2),
        ("merchant", "Fine wares!", default_id("merchant", "Fine wares!"), 3)]
    # the default id depends on the content only, so reordering the file keeps it
    again = parse_lines("npc,line\nguard,Other.\nmerchant,Fine wares!\n", NPCS)
    assert again[1].id == lines[1].id
    assert parse_lines("\ufeffnpc,line\nguard,Halt.\n", NPCS)[0].npc == "guard"  # Excel's BOM


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("npc,text\nguard,Halt.\n", "missing column(s) line; unknown column(s) text"),
    ("npc,line\n", "no lines below the header"),
    ("npc,line\nguard,\n", "row 2: line is empty"),
    ("npc,line\nking,Kneel.\n", "row 2: unknown npc 'king' (known: guard, merchant)"),
    ("npc,line,id\nguard,Halt.,../etc\n", "row 2: id '../etc' is not a file name"),
    ("npc,line,id\nguard,Halt.,a\nguard,Stop.,a\n", "row 3: id 'a' already used in row 2"),
])
def test_bad_files_say_which_row_and_why(text, message):
    with pytest.raises(LinesError) as exc:
        parse_lines(text, NPCS, where="lines.csv")
    assert message in str(exc.value)
    assert str(exc.value).startswith("lines.csv: ")


def test_every_problem_at_once():
    with pytest.raises(LinesError) as exc:
        parse_lines("npc,line\nking,A.\nguard,\nguard,Fine.\n", NPCS)
    assert "row 2" in str(exc.value) and "row 3" in str(exc.value)


def test_not_baked_without_outputs_or_with_another_text(tmp_path):
    line = Line("guard", "Halt.", "halt")
    assert not baked(tmp_path, line)
    other = Line("guard", "Stop.", "halt").digest()
    (tmp_path / "halt.json").write_text(json.dumps({"digest": other, "samples": 1, "rate": 1,
                                                    "frames": 0}))
    assert not baked(tmp_path, line)


def test_bake_redis_beside_a_cluster():
    cfg = Config.load(env={})
    assert bake_url(cfg, "redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(BakeConfigError, match="PARLEY_BAKE_REDIS_URL"):
        bake_url(cfg, "redis+cluster://h:7000")
    cfg = Config.load(env={"PARLEY_BAKE_REDIS_URL": "redis://bake:6379/0"})
    assert bake_url(cfg, "redis+cluster://h:7000") == "redis://bake:6379/0"
    cfg = Config.load(env={"PARLEY_BAKE_REDIS_URL": "redis+cluster://h:7000"})
    with pytest.raises(BakeConfigError, match="plain Redis"):
        bake_url(cfg, "redis://h:1/0")


def test_job_ids_follow_folder_and_content(tmp_path):
    a, b = Line("guard", "Halt.", "x"), Line("guard", "Stop.", "x")
    assert job_id(tmp_path, a) == job_id(tmp_path, a)
    assert job_id(tmp_path, a) != job_id(tmp_path, b)
    assert job_id(tmp_path, a) != job_id(tmp_path / "other", a)
