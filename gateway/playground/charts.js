// The turn's latency waterfall (turn_done.timings, docs/protocol.md section 3.2) and the curves
// of a few face values over the turn, drawn on canvases.
import { FACE } from "./protocol.js";

// Steps in pipeline order; each bar runs from the end of the player's speech (eos) to the step.
export const STEPS = ["speech_start", "eos", "final_transcript", "llm_start", "first_token",
  "first_fragment", "tts_first_chunk", "first_face", "gw_first_audio", "page_first_audio",
  "ready", "gw_first_face", "page_playing"];
const STAGE_COLOR = { speech_start: "#8a8", eos: "#8a8", final_transcript: "#6a6", llm_start: "#c96",
  first_token: "#c96", first_fragment: "#c96", tts_first_chunk: "#69c", first_face: "#a6c",
  gw_first_audio: "#888", page_first_audio: "#444", ready: "#444", gw_first_face: "#888",
  page_playing: "#222" };

function setup(canvas) {
  const g = canvas.getContext("2d");
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.font = "12px system-ui, sans-serif";
  return g;
}

/** A waterfall: each step's bar runs from the step before it to the step, on a time axis from
 *  the end of the player's speech (eos = 0 ms; speech_start lies before it). The label gives
 *  the step's own share and, in brackets, the time since eos. */
export function drawWaterfall(canvas, timings) {
  const g = setup(canvas);
  const steps = STEPS.filter((k) => typeof timings[k] === "number");
  if (!steps.length || typeof timings.eos !== "number") {
    g.fillStyle = "#777"; g.fillText("latency waterfall: after the first turn", 10, 20);
    return [];
  }
  const t0 = timings.eos;
  let prev = 0; // the bars after eos follow each other; speech_start's spans the speech
  const rows = steps.map((k) => {
    const ms = timings[k] - t0;
    const from = ms <= 0 ? 0 : Math.min(prev, ms);
    prev = Math.max(prev, ms);
    return { step: k, ms, from };
  });
  const lo = Math.min(0, ...rows.map((r) => r.ms)), hi = Math.max(1, ...rows.map((r) => r.ms));
  const left = 120, right = canvas.width - 120, h = Math.min(18, (canvas.height - 10) / rows.length);
  const x = (ms) => left + ((ms - lo) / (hi - lo)) * (right - left);
  rows.forEach((r, i) => {
    const y = 5 + i * h;
    g.fillStyle = "#333"; g.textAlign = "right"; g.fillText(r.step, left - 6, y + h * 0.7);
    g.fillStyle = STAGE_COLOR[r.step] || "#999";
    const a = x(r.from), b = x(r.ms);
    g.fillRect(Math.min(a, b), y + 2, Math.max(2, Math.abs(b - a)), h - 4);
    g.fillStyle = "#333"; g.textAlign = "left";
    const own = r.ms <= 0 ? "" : `+${Math.round(r.ms - r.from)} ms `;
    g.fillText(`${own}(${Math.round(r.ms)})`, Math.max(a, b) + 4, y + h * 0.7);
  });
  g.strokeStyle = "#aaa"; g.beginPath(); g.moveTo(x(0), 0); g.lineTo(x(0), canvas.height); g.stroke();
  return rows;
}

export const CURVES = [["JawOpen", "#c0392b"], ["MouthClose", "#2980b9"], ["EyeBlink", "#27ae60"]];

/** JawOpen, MouthClose and EyeBlink (mean of both eyes) against the turn's time, with the
 *  play head at `pos` samples. */
export function drawCurves(canvas, faces, rate, pos, audioEnd = 0) {
  const g = setup(canvas);
  const w = canvas.width, h = canvas.height, pad = 18;
  g.strokeStyle = "#ddd"; g.strokeRect(pad, 4, w - pad - 4, h - pad - 4);
  if (!faces.length || !rate) {
    g.fillStyle = "#777"; g.fillText("face curves: while the NPC speaks", 24, 22);
    return;
  }
  const end = Math.max(audioEnd, faces[faces.length - 1].sample, 1); // the reply's length
  const x = (s) => pad + (s / end) * (w - pad - 4);
  const y = (v) => 4 + (1 - Math.max(0, Math.min(1, v))) * (h - pad - 4);
  for (const [name, color] of CURVES) {
    const get = name === "EyeBlink"
      ? (v) => (v[FACE.EyeBlinkLeft] + v[FACE.EyeBlinkRight]) / 2 : (v) => v[FACE[name]];
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    faces.forEach((f, i) => (i ? g.lineTo : g.moveTo).call(g, x(f.sample), y(get(f.values))));
    g.stroke();
  }
  g.fillStyle = "#555"; g.textAlign = "left";
  g.fillText(`${(end / rate).toFixed(2)} s`, w - 50, h - 4);
  let lx = pad + 4;
  for (const [name, color] of CURVES) { g.fillStyle = color; g.fillText(name, lx, h - 4); lx += 80; }
  if (pos > 0) { g.strokeStyle = "#000"; g.beginPath(); g.moveTo(x(pos), 4); g.lineTo(x(pos), h - pad); g.stroke(); }
}
