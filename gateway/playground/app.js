// The playground page: talk to an NPC through the gateway this page came from, hear the reply
// on Web Audio's clock, watch the face pinned to it, see each turn's latency; replay stored
// turns. `window.parley` exposes what the page did, for people and for the browser test.
import { drawCurves, drawWaterfall } from "./charts.js";
import { drawFace } from "./face.js";
import { Mic } from "./mic.js";
import { ReplyPlayer } from "./player.js";
import {
  decodeFrame, decodeServer, encodeClient, encodeMic, FACE, FACE_VALUES, FRAME, PROTOCOL_VERSION,
} from "./protocol.js";

const $ = (id) => document.getElementById(id);
const state = window.parley = {
  status: "idle", session: null, sid: null, npcs: [], errors: [], readySent: [], interrupts: [],
  turns: {}, micChunks: 0, audioFrames: 0, faceFrames: 0, audioScheduledS: 0, drawn: 0,
  faceChanges: 0, jawWhileSpeaking: [1, 0], replays: 0, speaking: false,
};
let ctx = null, player = null, ws = null, mic = null;
let channel = 0, micSeq = 1, endpoint = "vad", talking = false;
let viewKey = null;
const turns = new Map(); // key -> what the page knows of a turn
const lastSeq = new Map(); // "turn:channel" -> last seq (duplicates after a resume are dropped)

function setStatus(text) { state.status = text; $("status").textContent = text; }

function turnOf(key, turn) {
  let t = turns.get(key);
  if (!t) {
    t = { key, turn, partial: "", transcript: "", segments: [], reply: "", timings: {}, page: {},
      done: false, interrupted: false };
    turns.set(key, t);
    state.turns[key] = t;
  }
  return t;
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(encodeClient(msg));
}

async function audio() {
  if (!ctx) {
    ctx = new AudioContext();
    player = new ReplyPlayer(ctx, onReady);
  }
  await ctx.resume();
}

// ------------------------------------------------------------------ live session

async function connect() {
  await audio();
  if (ws) ws.close(); // its sessions go with it (detached; this page never resumes them)
  state.session = null;
  channel = 0;
  endpoint = document.querySelector("input[name=mode]:checked").value;
  const sock = ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`);
  ws.binaryType = "arraybuffer";
  setStatus("connecting");
  ws.onopen = () => send({ type: "hello", protocol: PROTOCOL_VERSION, client: "parley-playground", ...token() });
  ws.onmessage = (e) => {
    try {
      if (typeof e.data === "string") onText(decodeServer(e.data), liveKey);
      else onFrame(decodeFrame(e.data), liveKey);
    } catch (err) {
      if (err.code === "unknown_type") return; // a later protocol's message: not for us
      state.errors.push({ code: err.code || "page", message: String(err.message || err) });
      console.error("parley:", err);
    }
  };
  ws.onclose = () => {
    if (ws !== sock) return; // the connection this one replaced
    setStatus("disconnected");
    channel = 0;
    $("talk").disabled = $("hangup").disabled = true;
  };
}

// A gateway with tokens: open the page as http(s)://HOST:PORT/#token=NAME:SECRET (a fragment
// never leaves the browser).
function token() {
  const m = /(?:^#|&)token=([^:&]+):([^&]+)/.exec(location.hash);
  return m ? { token_name: decodeURIComponent(m[1]), token: decodeURIComponent(m[2]) } : {};
}

function openSession() {
  const npc = $("npc").value;
  if (state.session && channel) send({ type: "close", session: state.session });
  state.session = `${npc}-${Math.random().toString(36).slice(2, 8)}`;
  channel = 0;
  send({ type: "open", session: state.session, npc, sample_rate: ctx.sampleRate, channels: 1,
    format: "s16le", endpoint });
}

async function opened(msg) {
  channel = msg.channel;
  micSeq = msg.next_mic_seq;
  state.sid = msg.sid;
  setStatus(`talking to ${msg.npc} (${endpoint === "vad" ? "hands-free" : "press to talk"})`);
  $("talk").disabled = endpoint !== "client";
  $("hangup").disabled = false;
  if (!mic) {
    try {
      mic = await new Mic(ctx, onMic).start();
    } catch (err) {
      setStatus(`no microphone: ${err.message} (browsers allow it on localhost or https only)`);
    }
  }
}

function hangUp() { // close the session for good: the mic stops going out, replay keeps it
  if (state.session) send({ type: "close", session: state.session });
  state.session = null;
  channel = 0;
  $("talk").disabled = $("hangup").disabled = true;
}

function onMic(pcm, rms) {
  $("level").style.width = `${Math.min(100, rms * 400)}%`;
  state.micIn = (state.micIn || 0) + 1;
  state.micRms = rms;
  state.quietChunks = rms < 0.005 ? (state.quietChunks || 0) + 1 : 0;
  if (!channel || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (endpoint === "client" && !talking) return;
  ws.send(encodeMic(channel, micSeq++, pcm));
  state.micChunks++;
}

function onReady(key, turn, segment) {
  if (!key.startsWith("live:")) return; // a replay answers to nobody
  send({ type: "ready", session: state.session, turn, segment });
  state.readySent.push([turn, segment]);
}

function talk(down) {
  if (endpoint !== "client" || !channel || down === talking) return;
  talking = down;
  $("talk").classList.toggle("down", down);
  if (down) {
    const playing = player.playing();
    if (playing && playing.key.startsWith("live:")) { // the player cuts the NPC off
      const played = player.stop(playing.key);
      send({ type: "interrupt", session: state.session, played_samples: played });
      state.interrupts.push({ turn: playing.key, played, by: "page" });
    }
  } else {
    send({ type: "end_of_utterance", session: state.session });
  }
}

// ------------------------------------------------------------------ messages, live or replayed

// live turns are keyed by the stored session, so a new NPC's turn 1 is a new turn
const liveKey = (n) => `live:${state.sid}:${n}`;

function fresh(turn, chan, seq) {
  const k = `${state.sid}:${turn}:${chan}`;
  if (seq <= (lastSeq.get(k) || 0)) return false;
  lastSeq.set(k, seq);
  return true;
}

function onText(msg, keyOf) {
  const live = keyOf(0).startsWith("live:");
  if (live && msg.session !== undefined && msg.session !== state.session
      && msg.type !== "closed" && msg.type !== "error") return; // a session this page left
  switch (msg.type) {
    case "welcome":
      state.npcs = msg.npcs;
      if (!$("npc").options.length) { // no persona list from the API (a gateway with tokens)
        for (const id of msg.npcs) $("npc").add(new Option(id, id));
      }
      for (const o of $("npc").options) o.disabled = !msg.npcs.includes(o.value);
      if (!msg.npcs.includes($("npc").value)) $("npc").value = msg.npcs[0];
      openSession();
      break;
    case "opened": opened(msg); break;
    case "transcript": {
      if (live && !fresh(msg.turn, "transcript", msg.seq)) return;
      const t = turnOf(keyOf(msg.turn), msg.turn);
      if (msg.final) { t.transcript = msg.text; t.partial = ""; } else t.partial = msg.text;
      viewKey = t.key;
      break;
    }
    case "reply": {
      if (live && !fresh(msg.turn, "reply", msg.seq)) return;
      const t = turnOf(keyOf(msg.turn), msg.turn);
      if (msg.final) t.reply = msg.text; else t.segments[msg.segment] = msg.text;
      break;
    }
    case "turn_done": {
      const t = turnOf(keyOf(msg.turn), msg.turn);
      t.done = true;
      t.interrupted = msg.interrupted;
      if (msg.no_speech) t.transcript = "(no speech heard)";
      t.audioSamples = msg.audio_samples;
      if (msg.timings) Object.assign(t.timings, msg.timings);
      break;
    }
    case "stop": { // the player spoke over the NPC: stop, say how much was heard
      const key = keyOf(msg.turn);
      const played = player.stop(key);
      send({ type: "interrupt", session: state.session, played_samples: played });
      state.interrupts.push({ turn: key, played, by: "server" });
      break;
    }
    case "error":
      if (msg.code === "overloaded" && live && msg.session === state.session) {
        // the fleet is at capacity: show the NPC as busy and open again when it says
        const wait = Number((/retry in (\d+) ms/.exec(msg.message) || [0, 1000])[1]);
        state.busy = (state.busy || 0) + 1;
        setStatus(`${$("npc").value} is busy (${msg.message}); trying again`);
        setTimeout(() => { if (!channel && ws && ws.readyState === WebSocket.OPEN) openSession(); }, Math.max(250, wait));
        break;
      }
      state.errors.push({ code: msg.code, message: msg.message, turn: msg.turn });
      setStatus(`error ${msg.code}: ${msg.message}`);
      break;
    case "closed": state.closed = msg.session; setStatus(`session ${msg.session} closed`); break;
    case "taken_over": setStatus("this session was resumed elsewhere"); channel = 0; break;
    default: break;
  }
  render();
}

function onFrame(f, keyOf) {
  const key = keyOf(f.turn);
  if (key.startsWith("live:") && f.channel !== channel) return; // a session this page left
  if (f.kind === FRAME.REPLY_AUDIO) {
    if (key.startsWith("live:") && !fresh(f.turn, "audio", f.seq)) return;
    const t = turnOf(key, f.turn);
    const live = key.startsWith("live:"); // a replay's marks would be timed against today
    if (live && t.page.page_first_audio === undefined) t.page.page_first_audio = Date.now();
    player.audio(key, f);
    const pt = player.turns.get(key);
    if (live && t.page.page_playing === undefined && pt.t0 !== null) {
      t.page.page_playing = Date.now() + (pt.t0 - ctx.currentTime) * 1000;
    }
    state.audioFrames++;
    state.audioScheduledS = [...player.turns.values()].reduce((s, x) => s + x.scheduledS, 0);
  } else if (f.kind === FRAME.FACE_FRAMES) {
    if (key.startsWith("live:") && !fresh(f.turn, "face", f.seq)) return;
    turnOf(key, f.turn);
    player.face(key, f);
    state.faceFrames += f.frame_count;
  }
}

// ------------------------------------------------------------------ drawing

// The text panels follow the newest turn (what the player just said); the waterfall shows the
// newest turn that has its timings, the curves the turn playing (else the last one played).
let chartKey = null;

function render() {
  const t = viewKey && turns.get(viewKey);
  if (!t) return;
  const tr = $("transcript");
  tr.textContent = t.transcript || t.partial;
  tr.classList.toggle("partial", !t.transcript);
  $("reply").textContent = t.reply || t.segments.filter(Boolean).join(" ");
  const timed = [...turns.values()].filter((x) => x.timings.eos !== undefined).pop() || t;
  $("turnlabel").textContent = `${timed.key.startsWith("live:") ? "turn" : "replay of turn"} ${timed.turn}${timed.interrupted ? " (interrupted)" : ""}`;
  timed.waterfall = drawWaterfall($("waterfall"), { ...timed.timings, ...timed.page });
  renderLog();
}

function renderLog() {
  const log = $("log");
  log.textContent = "";
  for (const t of turns.values()) {
    const li = document.createElement("li");
    const tag = t.key.startsWith("live:") ? "" : " (replay)";
    li.textContent = `You${tag}: ${t.transcript || t.partial || "…"} — NPC: ${t.reply || t.segments.filter(Boolean).join(" ") || "…"}`;
    log.appendChild(li);
  }
}

const idle = new Float32Array(FACE_VALUES);
let last = null;

function frame() {
  requestAnimationFrame(frame);
  let values = null, note = "idle";
  const playing = player && player.playing();
  if (playing) {
    const pos = player.played(playing.key);
    values = player.faceAt(playing, pos);
    note = `${playing.key.startsWith("live:") ? "live" : "replay"} turn ${playing.key.split(":").pop()}: sample ${pos} of ${playing.end}${values ? "" : " (no face yet)"}`;
    const newest = playing.faces.length ? playing.faces[playing.faces.length - 1].sample : 0;
    if (values && pos - newest > playing.rate / 20) { // lipsync behind the voice: say so
      note += `; face ${Math.round(((pos - newest) / playing.rate) * 1000)} ms late`;
      state.faceLateFrames = (state.faceLateFrames || 0) + 1;
    }
    if (values) {
      const jaw = values[FACE.JawOpen];
      state.jawWhileSpeaking = [Math.min(state.jawWhileSpeaking[0], jaw), Math.max(state.jawWhileSpeaking[1], jaw)];
    }
    chartKey = playing.key;
    drawCurves($("curves"), playing.faces, playing.rate, pos, playing.end);
  } else if (chartKey && player.turns.get(chartKey)) { // faces may still come after the audio
    const t = player.turns.get(chartKey);
    drawCurves($("curves"), t.faces, t.rate, 0, t.end);
  }
  state.speaking = Boolean(playing && values);
  if (!values) { // between replies: the page's own slow blink, not the server's
    idle[FACE.EyeBlinkLeft] = idle[FACE.EyeBlinkRight] = (performance.now() % 4000) < 120 ? 1 : 0;
    values = idle;
  }
  if (last && values.some((v, i) => v !== last[i])) state.faceChanges++;
  last = values.slice();
  drawFace($("face"), values);
  $("facenote").textContent = note;
  state.drawn++;
}

// ------------------------------------------------------------------ replay

async function loadSessions() {
  const r = await fetch("/api/sessions");
  const box = $("sessions");
  box.textContent = "";
  if (!r.ok) { $("replaynote").textContent = (await r.json()).error; return; }
  for (const s of (await r.json()).sessions) {
    if (!s.turns.length) continue;
    const o = document.createElement("option");
    o.value = s.sid;
    o.dataset.turns = s.turns.join(",");
    o.textContent = `${s.npc}: ${s.sid} (${new Date(s.created).toLocaleTimeString()}, ${s.turns.length} turn${s.turns.length > 1 ? "s" : ""})`;
    box.appendChild(o);
  }
  $("replaynote").textContent = box.options.length ? "" : "no stored turns yet: talk first";
}

function pickSession() {
  const o = $("sessions").selectedOptions[0];
  const turnsBox = $("turns");
  turnsBox.textContent = "";
  for (const n of o ? o.dataset.turns.split(",") : []) {
    const t = document.createElement("option");
    t.value = n; t.textContent = `turn ${n}`;
    turnsBox.appendChild(t);
  }
  $("replay").disabled = !turnsBox.options.length;
}

async function replay() {
  await audio();
  const sid = $("sessions").value, turn = $("turns").value;
  const r = await fetch(`/api/sessions/${encodeURIComponent(sid)}/turns/${turn}`);
  const data = await r.json();
  if (!r.ok) { $("replaynote").textContent = data.error; return; }
  const run = ++state.replays;
  const keyOf = (n) => `replay${run}:${sid}:${n}`;
  for (const item of data.items) {
    if (item.text) onText(decodeServer(item.text), keyOf);
    else onFrame(decodeFrame(Uint8Array.from(atob(item.binary), (c) => c.charCodeAt(0))), keyOf);
  }
  viewKey = keyOf(data.turn);
  render();
  $("replaynote").textContent = `replaying ${data.npc} turn ${data.turn}`;
}

// ------------------------------------------------------------------ wiring

async function init() {
  const r = await fetch("/api/personas");
  for (const p of r.ok ? (await r.json()).personas : []) {
    $("npc").add(new Option(`${p.name} (${p.id})`, p.id));
  }
  $("connect").onclick = connect;
  $("hangup").onclick = hangUp;
  $("npc").onchange = () => { if (ws && ws.readyState === WebSocket.OPEN) openSession(); };
  const t = $("talk");
  t.onpointerdown = () => talk(true);
  t.onpointerup = t.onpointerleave = () => talk(false);
  addEventListener("keydown", (e) => { if (e.code === "Space" && !e.repeat && e.target === document.body) { e.preventDefault(); talk(true); } });
  addEventListener("keyup", (e) => { if (e.code === "Space") talk(false); });
  $("sessions").onchange = pickSession;
  $("refresh").onclick = loadSessions;
  $("replay").onclick = replay;
  await loadSessions();
  requestAnimationFrame(frame);
  drawWaterfall($("waterfall"), {});
}

init();
