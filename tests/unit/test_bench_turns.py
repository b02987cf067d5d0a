"""`parley bench turns`: its utterance set has the boundaries it claims, its offline decision
counts a cut-off as one, and its report ends with the key=value line."""

from __future__ import annotations

import numpy as np

from benchmarks import turns as T
from workers.stt.listener import ListenerConfig


def test_the_set_covers_the_rates_scenes_pauses_and_held_out_real_speech():
    items = T.build_set()
    assert {i.rate for i in items} == {8000, 16000, 44100, 48000}
    assert any("jfk" in i.name and i.held_out for i in items)
    assert 0 < sum(i.held_out for i in items) < len(items)
    for it in items:
        x = it.audio[:, 0].astype(np.float32) / 32768
        # nothing speech-loud after the marked end: only the scene's tail
        after = x[it.end + it.rate // 50:]
        assert len(after) >= 2 * it.rate
        assert np.sqrt(np.mean(after ** 2)) < 0.02, it.name
        before = x[it.end - it.rate // 5: it.end]
        assert np.sqrt(np.mean(before ** 2)) > 0.01, it.name  # speech right up to the end


def test_offline_decision_counts_a_pause_cut_as_a_cut_off():
    items = {i.name: i for i in T.build_set()}
    paused = next(i for n, i in items.items() if "pause 600 ms" in n)
    plain = next(i for n, i in items.items() if n.startswith("'Tell me about"))
    short = ListenerConfig(vad="energy", silence_ms=300)
    long = ListenerConfig(vad="energy", silence_ms=900)
    assert T.offline_row(paused, T.decide(paused, short))["cutoff"]
    row = T.offline_row(paused, T.decide(paused, long))
    assert not row["cutoff"] and not row["missed"] and 850 <= row["endpoint_ms"] <= 1300
    row = T.offline_row(plain, T.decide(plain, short))
    assert not row["cutoff"] and row["turns"] == 1


def test_a_models_separation_is_measured_at_every_pause_without_it_ending_the_turn():
    items = {i.name: i for i in T.build_set()}
    paused = next(i for n, i in items.items() if "pause 600 ms" in n)
    cfg = ListenerConfig(vad="energy", turn_model=True, turn_pause_ms=200)

    class Sure:  # test double: a "model" that calls every pause the end
        name = "sure"

        def predict(self, audio):
            return 1.0

    # deciding, it cuts the sentence at its pause; measured, it is asked there and at the end
    assert T.offline_row(paused, T.decide(paused, cfg, Sure()))["cutoff"]
    asked = T.model_checks([paused], cfg, Sure())
    assert [at_end for at_end, _ in asked] == [False, True]
    assert T.auc(asked) == 0.5  # the same answer everywhere tells nothing

    class Oracle:  # test double: knows how long the sentence is
        name = "oracle"

        def predict(self, audio):
            return float(len(audio) > 16000 * 2.5)

    assert T.auc(T.model_checks([paused], cfg, Oracle())) == 1.0
    assert T.auc([(True, 0.2), (False, 0.9), (False, 0.1)]) == 0.5
    assert np.isnan(T.auc([(True, 0.2)]))


def test_report_ends_with_one_key_value_line():
    def rows(v2v, cut):
        return [{"item": f"u{i}", "held_out": i % 3 == 0, "turns": 1, "cutoff": i < cut,
                 "missed": False, "v2v_ms": v2v + i, "endpoint_ms": 500.0,
                 "overhead_ms": 4.0} for i in range(6)]

    text = T.report({"energy-500": {"hands_free": rows(900, 2), "ptt": []},
                     "silero-800": {"hands_free": rows(1100, 0), "ptt": rows(90, 0)}})
    last = text.splitlines()[-1]
    assert last.startswith("best=silero-800 v2v_p50_ms=1102 ")
    assert "baseline_cutoff_rate=0.333" in last and "ptt_p50_ms=92" in last
    assert all("=" in kv for kv in last.split())


def test_offline_speculation_counts_a_pause_that_went_on_and_a_sentence_end():
    """One utterance with a 600 ms pause inside: at every speculate_ms up to 500 the pause is
    a likely end the speaker went on from, and the end of the sentence one that is settled
    (adopted or, where the last word changed, cancelled)."""
    from workers.stt.pocketsphinx_backend import PocketsphinxBackend
    from workers.tts.espeak import EspeakSynth

    item = T.synth_item(EspeakSynth(), "Can you tell me where the old mill is?", 4, 600, 16000,
                        "silence", False, np.random.default_rng(1))
    backend = PocketsphinxBackend(pool_size=1)
    counts = T._speculation_pass(item, backend, values=(250, 500))
    for c in counts.values():
        assert c["started"] == 2 and c["resumed"] == 1, counts
        assert c["adopted"] + c["changed"] == 1, counts


def _speech(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, speech-loud stretch (a 150 Hz buzz with a syllable-rate envelope)."""
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * env * np.sign(np.sin(2 * np.pi * 150 * t))).astype(np.float32)


def test_a_users_recording_is_one_held_out_utterance_with_its_own_background(tmp_path):
    import soundfile as sf

    rate, rng = 22050, np.random.default_rng(3)
    room = rng.standard_normal(int(0.5 * rate)).astype(np.float32) * 0.003  # -50 dBFS
    speech = _speech(rate, 1.2)
    mono = np.concatenate([room, speech, room[: rate // 5]])  # 200 ms of tail: too little
    sf.write(tmp_path / "q.wav", np.stack([mono, mono], axis=1), rate)

    it = T.load_recording(str(tmp_path / "q.wav"))
    assert it.rate == rate and it.held_out and it.name == "q.wav 22.05k"
    lead = int(T.LEAD_S * rate)
    assert abs(it.end - (lead + len(room) + len(speech))) <= rate // 50  # marked from its level
    x = it.audio[:, 0].astype(np.float32) / 32768
    after = x[it.end + rate // 50:]
    assert len(after) >= T.TAIL_S * rate - rate // 50
    # made up with its own room tone, not digital silence
    assert 0.001 < np.sqrt(np.mean(after ** 2)) < 0.01

    given = T.load_recording(f"{tmp_path / 'q.wav'}@1.0")
    assert given.end == lead + rate
    (tmp_path / "notes.txt").write_text("not audio")
    assert [i.name for i in T.recordings([str(tmp_path)])] == ["q.wav 22.05k"]


def test_opus_is_read_and_a_phones_m4a_is_named_with_how_to_convert_it(tmp_path, capsys):
    import pytest
    import soundfile as sf

    rate = 48000
    sf.write(tmp_path / "v.opus", np.concatenate([np.zeros(rate // 2), _speech(rate, 1.0),
                                                  np.zeros(rate // 2)]), rate,
             format="OGG", subtype="OPUS")
    (tmp_path / "phone.m4a").write_bytes(b"\0\0\0\x20ftypM4A ")
    assert [i.name for i in T.recordings([str(tmp_path)])] == ["v.opus 48k"]
    assert "skipped phone.m4a: m4a is not read here; convert it" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"phone.m4a: m4a is not read here.*ffmpeg -i"):
        T.load_recording(str(tmp_path / "phone.m4a"))


def test_a_recording_in_digital_silence_is_padded_with_silence_not_its_quiet_speech(tmp_path):
    """A synthesized or trimmed file: digital silence before and after the words. Its pad
    after the end is that silence, not its quietest frames (its softest syllables), which a
    VAD would hear as more speech; so the turn ends as after any sentence."""
    import soundfile as sf

    from benchmarks.speech import speech

    x = speech("Where can I find the blacksmith in this town?", rate=16000)[:, 0]
    sf.write(tmp_path / "tts.wav", x, 16000, subtype="PCM_24")
    it = T.load_recording(str(tmp_path / "tts.wav"))
    after = it.audio[it.end + 320:, 0]
    assert len(after) >= T.TAIL_S * 16000 - 320 and not after.any()
    ends = T.decide(it, ListenerConfig(vad="silero", silence_ms=800))
    row = T.offline_row(it, ends)
    assert row["turns"] == 1 and not row["cutoff"] and not row["missed"]
    assert 700 <= row["endpoint_ms"] <= 900


def test_a_quiet_mics_recording_is_marked_at_its_last_word_and_answered(tmp_path):
    """A mic 36 dB down (speech near -55 dBFS RMS, a -100 dBFS floor): the end of speech used
    to be the last frame over -60 dBFS, 140 ms before the last word, so every figure of the
    file was off by that much."""
    import soundfile as sf

    from benchmarks.speech import speech

    x = speech("Where can I find the blacksmith in this town?", rate=16000)[:, 0] / 32768
    words = T.speech_span(x, 16000)
    quiet = x * 10 ** (-36 / 20) + np.random.default_rng(1).standard_normal(len(x)) * 1e-5
    sf.write(tmp_path / "far.wav", quiet.astype(np.float32), 16000, subtype="FLOAT")
    it = T.load_recording(str(tmp_path / "far.wav"))
    assert abs(it.end - int(T.LEAD_S * 16000) - words[1]) <= 320
    row = T.offline_row(it, T.decide(it, ListenerConfig(vad="silero", silence_ms=800)))
    assert row["turns"] == 1 and not row["cutoff"] and not row["missed"]
    assert 700 <= row["endpoint_ms"] <= 900


def test_a_recording_cut_tight_is_padded_with_its_pauses_and_a_click_is_left_out(tmp_path):
    import soundfile as sf

    rate, rng = 16000, np.random.default_rng(5)
    room = (rng.standard_normal(rate // 2) * 0.003).astype(np.float32)  # -50 dBFS
    click = np.zeros(rate // 50, np.float32)
    click[::40] = 0.5
    # noise and a click after the words; the end given, as for a door after the last word
    mono = np.concatenate([room, _speech(rate, 1.0), room, click, room])
    sf.write(tmp_path / "door.wav", mono, rate)
    it = T.load_recording(f"{tmp_path / 'door.wav'}@1.5")
    x = it.audio[:, 0].astype(np.float32) / 32768
    lead = x[: int(T.LEAD_S * rate)]
    assert 0.002 < np.sqrt(np.mean(lead ** 2)) < 0.005 and np.abs(lead).max() < 0.05
    # no pause around it at all: the quietest frames of its pauses inside
    tight = np.concatenate([_speech(rate, 1.0), room[: rate * 2 // 5], _speech(rate, 1.0)])
    sf.write(tmp_path / "tight.wav", tight, rate)
    it = T.load_recording(str(tmp_path / "tight.wav"))
    pad = it.audio[it.end:, 0].astype(np.float32) / 32768
    assert 0.002 < np.sqrt(np.mean(pad ** 2)) < 0.005


def test_a_recording_that_cannot_be_measured_says_why(tmp_path):
    import pytest
    import soundfile as sf

    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "q.wav", _speech(16000, 1.0), 16000)
    cases = {str(tmp_path / "missing.wav"): "cannot read it as audio",
             str(tmp_path / "silent.wav"): "no speech found",
             f"{tmp_path / 'q.wav'}@late": "must be seconds",
             f"{tmp_path / 'q.wav'}@3": "outside the file"}
    for spec, why in cases.items():
        with pytest.raises(ValueError, match=why):
            T.load_recording(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no audio files in it \(wav, flac, ogg, .*mp3"):
        T.recordings([str(tmp_path / "empty")])


def test_a_setting_of_ones_own_is_read_as_the_worker_reads_it_and_wrong_ones_say_why():
    import pytest

    label, env = T.parse_setting("vad_silence_ms=650, stt.vad=energy")
    assert label == "stt:vad_silence_ms=650,vad=energy"
    assert env == {"PARLEY_STT_VAD_SILENCE_MS": "650", "PARLEY_STT_VAD": "energy"}
    (row,) = T._offline_settings({label: env}, available=lambda path: "not installed")
    assert row[0] == label and row[2] is None
    assert (row[1].silence_ms, row[1].vad, row[1].speculate_ms) == (650, "energy", 300)
    # auto uses the model only where it can run, as a worker does; a row asks the file its
    # setting names ("" is the one in the pipecat-ai wheel)
    _, env = T.parse_setting("turn_model=auto")
    assert [r[2] for r in T._offline_settings({"a": env}, available=lambda path: None)] == [""]
    assert [r[2] for r in T._offline_settings({"a": env}, available=lambda path: "no")] == [None]
    _, env = T.parse_setting("turn_model=smart-turn,turn_model_path=/models/mine.onnx")
    (row,) = T._offline_settings({"b": env}, available=lambda path: "not there")
    assert row[1].turn_model and row[2] == "/models/mine.onnx"
    for text, why in (("silence=3", "'silence' is not an \\[stt\\] setting"),
                      ("vad_silence_ms=soon", "cannot read 'soon' as int"),
                      ("vad=webrtc", "vad must be silero or energy"),
                      ("turn_model=gpt", "turn_model must be none, auto or smart-turn"),
                      ("vad_silence_ms", "write KEY=VALUE")):
        with pytest.raises(ValueError, match=why):
            T.parse_setting(text)


def test_the_players_rows_add_their_figures_to_the_summary_and_never_count_as_best():
    def rows(v2v, cut):
        return [{"item": f"u{i}", "held_out": False, "turns": 1, "cutoff": i < cut,
                 "missed": False, "v2v_ms": v2v + i, "endpoint_ms": 880.0} for i in range(4)]

    results = {"silero-800": {"hands_free": rows(900, 0), "ptt": [], "players": 1,
                              "setting": "silero-800"},
               "silero-800 x3 players": {"hands_free": rows(950, 1), "ptt": [], "players": 3,
                                         "setting": "silero-800"},
               "energy-500 x3 players": {"hands_free": rows(600, 2), "ptt": [], "players": 3,
                                         "setting": "energy-500"}}
    last = T.report(results).splitlines()[-1]
    assert last.startswith("best=silero-800 v2v_p50_ms=902 ")
    assert last.endswith(" players=3 players_v2v_p50_ms=952 players_v2v_p95_ms=953 "
                         "players_cutoff_rate=0.250 players_missed=0")
    # a run of crowds alone still names a setting
    assert T._best({"energy-500 x3 players": results["energy-500 x3 players"]})
