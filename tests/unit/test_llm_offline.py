from pathlib import Path

import pytest

from core.config import Config
from core.personas import load_personas
from workers.llm.fragmenter import Fragmenter
from workers.llm.scripted import ScriptedPersonaBackend

PERSONAS = Path(__file__).resolve().parents[2] / "personas"


def fragments(text, step=3):
    f = Fragmenter()
    out = []
    for i in range(0, len(text), step):  # streamed in small pieces, as tokens arrive
        out += f.push(text[i:i + step])
    return out + f.flush()


def test_first_fragment_is_cut_early_at_a_clause():
    out = fragments("Well now, traveller, the road is long. It winds through the hills. Go.")
    assert out[0] == "Well now, traveller,"
    assert out[1] == "the road is long."
    assert out[2:] == ["It winds through the hills.", "Go."]


def test_abbreviations_and_numbers_do_not_split():
    out = fragments("Dr. Smith paid 3.5 gold to St. Mary. She was pleased with the deal.")
    assert out == ["Dr. Smith paid 3.5 gold to St. Mary.", "She was pleased with the deal."]


def test_run_on_text_is_cut_at_a_space():
    f = Fragmenter(max_chars=40)
    out = f.push("word " * 30)
    assert out and all(len(x) <= 40 for x in out)


def test_every_persona_loads_with_a_voice_and_lines():
    personas = load_personas(PERSONAS)
    assert {"guard", "merchant", "innkeeper", "wizard"} <= set(personas)
    assert len({p.voice for p in personas.values()}) == len(personas)
    for p in personas.values():
        assert p.lines and p.fallback and p.system_prompt


@pytest.mark.parametrize("heard,persona,expect", [
    ("who are you", "guard", "Brannoc"),
    ("can you open the gate", "guard", "gate opens"),
    ("what do you sell", "merchant", "special price"),
    ("ask not what your country can do for you", "wizard", "Ask not"),
    ("xyzzy plugh", "innkeeper", "Can't say"),
])
def test_scripted_persona_picks_the_best_line(heard, persona, expect):
    p = load_personas(PERSONAS)[persona]
    assert expect in ScriptedPersonaBackend().choose(p, heard)


async def test_scripted_persona_streams_the_line_word_by_word():
    p = load_personas(PERSONAS)["guard"]
    tokens = [t async for t in ScriptedPersonaBackend().stream_reply(p, [], "who are you")]
    assert len(tokens) > 5 and "".join(tokens) == ScriptedPersonaBackend().choose(p, "who")


def test_config_from_file_and_environment(tmp_path):
    f = tmp_path / "parley.toml"
    f.write_text('[worker]\nclaim_idle_ms = 700\n[stt]\nbackends = ["pocketsphinx"]\n')
    cfg = Config.load(f, env={"PARLEY_REDIS_URL": "redis://h:1/2",
                              "PARLEY_WORKER_MAX_JOBS": "5",
                              "PARLEY_LLM_BACKENDS": "openai,scripted"})
    assert cfg.worker.claim_idle_ms == 700 and cfg.worker.max_jobs == 5
    assert cfg.redis.url == "redis://h:1/2" and cfg.llm.backends == ["openai", "scripted"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nclaim_idle = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'claim_idle'"):
        Config.load(bad, env={})
    with pytest.raises(ValueError, match="PARLEY_WORKER_MAX_JOBS"):
        Config.load(None, env={"PARLEY_WORKER_MAX_JOBS": "many"})
