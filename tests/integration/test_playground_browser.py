"""The playground in a real Chromium (Debian's, driven headless by Playwright; no browser is
downloaded), its microphone a WAV file of a spoken question: the page served by the fleet
connects, a turn completes, transcript and reply appear, the reply is scheduled on Web Audio,
the face moves with the jaw while the NPC speaks, a stored turn replays, and nothing is logged
as an error. A screenshot taken mid-reply is left in tests/artifacts/playground/."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ROOT, speech

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "tests" / "artifacts" / "playground"
QUESTION = "Can you open the gate?"  # espeak's voice, which the offline STT hears well
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"

SUMMARY = """() => {
  const p = window.parley;
  const turns = Object.values(p.turns).map((t) => ({
    key: t.key, transcript: t.transcript, reply: t.reply, done: t.done,
    interrupted: t.interrupted, timings: Object.keys(t.timings), page: Object.keys(t.page) }));
  return JSON.stringify({ status: p.status, sid: p.sid, errors: p.errors, turns,
    readySent: p.readySent, interrupts: p.interrupts, micChunks: p.micChunks,
    audioFrames: p.audioFrames, faceFrames: p.faceFrames, audioScheduledS: p.audioScheduledS,
    drawn: p.drawn, faceChanges: p.faceChanges, jaw: p.jawWhileSpeaking, replays: p.replays,
    faceLateFrames: p.faceLateFrames || 0, busy: p.busy || 0 });
}"""


def _mic_wav(tmp_path, silence_s: float):
    """A question, then silence: Chromium loops the file."""
    question = speech(QUESTION, 48000)[:, 0]
    wav = tmp_path / f"mic-{silence_s:g}.wav"
    sf.write(wav, np.concatenate([np.zeros(24000, np.int16), question,
                                  np.zeros(int(48000 * silence_s), np.int16)]), 48000,
             subtype="PCM_16")
    return wav


def _chromium(pw, wav):
    return pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
    ])


def test_a_turn_in_chromium_with_a_fake_microphone(fleet, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e .[dev]")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: scripts/bootstrap.sh dev installs Debian's chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground artifacts: {ARTIFACTS}")
    wav = _mic_wav(tmp_path, 40)  # hands-free: the NPC needs a quiet player to finish
    problems: list[str] = []
    t_start = time.perf_counter()
    with sync_api.sync_playwright() as pw:
        browser = _chromium(pw, wav)
        try:
            page = browser.new_page(viewport={"width": 1480, "height": 900})
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(
                f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(f"http://127.0.0.1:{fleet.port}/")
            page.select_option("#npc", "guard")
            page.click("#connect")
            page.wait_for_function("window.parley.micChunks > 10", timeout=60_000)
            # the NPC speaks: reply audio scheduled and face frames applied on its clock
            page.wait_for_function("window.parley.speaking && window.parley.faceFrames > 30",
                                   timeout=90_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "mid-reply.png"))
            try:  # better, once turn_done has brought the waterfall, if the NPC still speaks
                page.wait_for_function(
                    "!window.parley.speaking || Object.values(window.parley.turns)"
                    ".some(t => t.done && t.key.startsWith('live:'))", timeout=6_000)
                if page.evaluate("window.parley.speaking"):
                    page.wait_for_timeout(200)
                    page.screenshot(path=str(ARTIFACTS / "mid-reply.png"))
            except sync_api.TimeoutError:
                pass
            page.wait_for_function(
                "Object.values(window.parley.turns).some(t => t.done && !t.interrupted"
                " && t.key.startsWith('live:') && t.reply)", timeout=90_000)
            page.wait_for_function("!window.parley.speaking", timeout=60_000)
            page.click("#hangup")  # the fleet stops listening before the mic file loops
            page.wait_for_function("window.parley.closed", timeout=10_000)
            live = json.loads(page.evaluate(SUMMARY))

            # replay that turn from what Redis holds
            page.click("#refresh")
            page.wait_for_function(f"[...document.querySelectorAll('#sessions option')]"
                                   f".some(o => o.value === {json.dumps(live['sid'])})")
            page.select_option("#sessions", live["sid"])
            page.click("#replay")
            page.wait_for_function("window.parley.replays === 1 && window.parley.speaking",
                                   timeout=20_000)
            page.wait_for_timeout(400)
            page.screenshot(path=str(ARTIFACTS / "replay.png"))
            after = json.loads(page.evaluate(SUMMARY))
            t_live = time.perf_counter() - t_start
        finally:
            browser.close()
        # the question comes round every few seconds: press to talk, it is sent only while
        # held; hands-free, the player speaks over the NPC's reply
        browser = _chromium(pw, _mic_wav(tmp_path, 3))
        try:
            barged = _press_to_talk_and_cut_the_npc_off(browser, fleet.port, problems)
            t_ptt = time.perf_counter() - t_start
            spoken_over = _speak_over_the_npc(browser, fleet.port, problems)
        finally:
            browser.close()
    took = time.perf_counter() - t_start
    print(f"browser test: {took:.1f} s (hands-free turn and replay {t_live:.1f} s, press to "
          f"talk {t_ptt - t_live:.1f} s, spoken over {took - t_ptt:.1f} s); "
          f"hands-free {json.dumps(live)[:1500]}; "
          f"spoken over {json.dumps(spoken_over)[:800]}; press to talk {json.dumps(barged)[:800]}")

    assert not problems, problems
    assert not [e for e in live["errors"] if e["code"] != "not_playing"], live["errors"]
    done = [t for t in live["turns"] if t["done"] and not t["interrupted"] and t["reply"]]
    assert done and done[0]["transcript"], live["turns"]
    assert {"eos", "final_transcript", "gw_first_audio", "ready"} <= set(done[0]["timings"])
    assert "page_playing" in done[0]["page"]
    assert live["readySent"], "ready was never sent"
    assert live["audioScheduledS"] > 1.0 and live["faceFrames"] > 60
    jaw_min, jaw_max = live["jaw"]
    assert jaw_max - jaw_min > 0.2, f"the jaw barely moved while the NPC spoke: {live['jaw']}"
    assert live["faceChanges"] > 20
    for stop in live["interrupts"]:  # a barge-in (the sample has pauses) reports what played
        assert stop["played"] >= 0
    replayed = [t for t in after["turns"] if t["key"].startswith("replay1:")]
    assert replayed and replayed[0]["transcript"] and replayed[0]["reply"], after["turns"]
    assert (ARTIFACTS / "mid-reply.png").stat().st_size > 10_000
    # hands-free barge-in: the gateway's stop, answered with the samples played
    assert not spoken_over["errors"], spoken_over["errors"]
    stops = [i for i in spoken_over["interrupts"] if i["by"] == "server"]
    assert stops and stops[0]["played"] >= 0, spoken_over  # 0 when cut before it sounded
    assert any(t["interrupted"] for t in spoken_over["turns"]), spoken_over["turns"]
    # press to talk, then holding it again while the NPC speaks cuts it off: stopped at once,
    # `interrupt` with the samples played, and the gateway ends the turn as interrupted
    assert not barged["errors"], barged["errors"]
    assert barged["interrupts"] and barged["interrupts"][0]["by"] == "page", barged
    assert barged["interrupts"][0]["played"] > 0
    assert any(t["interrupted"] for t in barged["turns"]), barged["turns"]


def _page(browser, port: int, problems: list[str]):
    page = browser.new_page(viewport={"width": 1480, "height": 900})
    page.on("console", lambda m: m.type in ("error", "warning") and problems.append(
        f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(f"http://127.0.0.1:{port}/")
    return page


def _speak_over_the_npc(browser, port: int, problems: list[str]) -> dict:
    page = _page(browser, port, problems)
    page.click("#connect")
    page.wait_for_function("window.parley.interrupts.length > 0", timeout=90_000)
    page.screenshot(path=str(ARTIFACTS / "barge-in.png"))
    page.click("#hangup")
    page.wait_for_function("window.parley.closed", timeout=10_000)
    out = json.loads(page.evaluate(SUMMARY))
    page.close()
    return out


def _press_to_talk_and_cut_the_npc_off(browser, port: int, problems: list[str]) -> dict:
    page = _page(browser, port, problems)
    page.check("input[value=client]")
    page.click("#connect")
    # (a loaded fleet may answer `overloaded` first: the page opens again when told)
    page.wait_for_function("window.parley.status.startsWith('talking')", timeout=60_000)
    page.hover("#talk")
    page.mouse.down()
    # held while the player speaks: from the question's first word to the silence after it
    page.wait_for_function("window.parley.micRms > 0.02", timeout=20_000)
    page.wait_for_function("window.parley.quietChunks > 30", timeout=20_000)
    page.mouse.up()
    page.wait_for_function("window.parley.speaking", timeout=90_000)
    page.wait_for_timeout(500)
    page.mouse.down()  # the player talks over the NPC
    page.wait_for_function("Object.values(window.parley.turns).some(t => t.interrupted)",
                           timeout=20_000)
    page.mouse.up()
    page.click("#hangup")
    page.wait_for_function("window.parley.closed", timeout=10_000)
    return json.loads(page.evaluate(SUMMARY))
