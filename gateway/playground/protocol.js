// The Parley WebSocket protocol, version 2, written from docs/protocol.md: binary frames
// (section 4), JSON control messages with the field rules of section 3, the error codes of
// section 7. Plain ES module without dependencies: the page imports it, and node's test runner
// checks it against clients/vectors/protocol-vectors.json.

export const PROTOCOL_VERSION = 2;
export const FRAME = { MIC_AUDIO: 1, REPLY_AUDIO: 2, FACE_FRAMES: 3 };
export const FLAG_LAST_IN_SEGMENT = 0x01;
export const MIC_HEADER = 8;
export const REPLY_HEADER = 28;
export const FACE_HEADER = 20;
export const FACE_VALUES = 61;
export const FACE_RECORD = 8 + FACE_VALUES * 4;
export const MAX_JSON_DEPTH = 16;
const U32 = 4294967295;
const U53 = 9007199254740991;

// Section 4.5, index i = EARFaceBlendShape value i.
export const FACE_NAMES = [
  "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft",
  "EyeSquintLeft", "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight",
  "EyeLookOutRight", "EyeLookUpRight", "EyeSquintRight", "EyeWideRight", "JawForward",
  "JawLeft", "JawRight", "JawOpen", "MouthClose", "MouthFunnel", "MouthPucker", "MouthLeft",
  "MouthRight", "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
  "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
  "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft",
  "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft",
  "MouthUpperUpRight", "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft",
  "BrowOuterUpRight", "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft",
  "NoseSneerRight", "TongueOut", "HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw",
  "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
];
export const FACE = Object.fromEntries(FACE_NAMES.map((n, i) => [n, i]));

export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// ------------------------------------------------------------------ binary frames (section 4)

function u64(view, offset) {
  const v = view.getBigUint64(offset, true);
  return v <= BigInt(U53) ? Number(v) : v; // exact either way; Number while it is safe
}

/** Decodes one binary message (ArrayBuffer or a typed array view). */
export function decodeFrame(data) {
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
    : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.byteLength;
  if (n < 4) throw new ProtocolError("bad_audio", "binary frame shorter than its 4-byte header");
  const kind = view.getUint8(0), flags = view.getUint8(1), channel = view.getUint16(2, true);
  if (kind === FRAME.MIC_AUDIO) {
    if (n < MIC_HEADER) throw new ProtocolError("bad_audio", "mic audio frame shorter than its header");
    return { kind, flags, channel, seq: view.getUint32(4, true), pcm: bytes.subarray(MIC_HEADER) };
  }
  if (kind === FRAME.REPLY_AUDIO) {
    if (n < REPLY_HEADER) throw new ProtocolError("bad_message", "reply audio frame shorter than its header");
    if ((n - REPLY_HEADER) % 2) throw new ProtocolError("bad_message", "reply audio with an odd number of bytes");
    return {
      kind, flags, channel, turn: view.getUint32(4, true), seq: view.getUint32(8, true),
      segment: view.getUint32(12, true), sample_rate: view.getUint32(16, true),
      sample: u64(view, 20), pcm: bytes.subarray(REPLY_HEADER),
    };
  }
  if (kind === FRAME.FACE_FRAMES) {
    if (n < FACE_HEADER) throw new ProtocolError("bad_message", "face frame shorter than its header");
    const frameCount = view.getUint16(16, true), valueCount = view.getUint16(18, true);
    if (valueCount !== FACE_VALUES) throw new ProtocolError("bad_message", `face frame with ${valueCount} values`);
    if (n !== FACE_HEADER + frameCount * FACE_RECORD) {
      throw new ProtocolError("bad_message", `face frame of ${n} bytes; ${frameCount} records make ${FACE_HEADER + frameCount * FACE_RECORD}`);
    }
    const records = [];
    for (let i = 0; i < frameCount; i++) {
      const at = FACE_HEADER + i * FACE_RECORD;
      const values = new Float32Array(FACE_VALUES);
      for (let k = 0; k < FACE_VALUES; k++) values[k] = view.getFloat32(at + 8 + 4 * k, true);
      records.push({ sample: u64(view, at), values });
    }
    return {
      kind, flags, channel, turn: view.getUint32(4, true), seq: view.getUint32(8, true),
      segment: view.getUint32(12, true), frame_count: frameCount, value_count: valueCount, records,
    };
  }
  throw new ProtocolError("bad_message", `unknown binary frame kind ${kind}`);
}

/** A mic frame: 8-byte header, then the PCM bytes (a typed array in the session's format). */
export function encodeMic(channel, seq, pcm) {
  const body = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  const out = new Uint8Array(MIC_HEADER + body.byteLength);
  const view = new DataView(out.buffer);
  view.setUint8(0, FRAME.MIC_AUDIO);
  view.setUint8(1, 0);
  view.setUint16(2, channel, true);
  view.setUint32(4, seq >>> 0, true);
  out.set(body, MIC_HEADER);
  return out;
}

// ------------------------------------------------------------------ JSON (section 1 and 3)

// A parser of our own: JSON.parse cannot tell 7.0 from 7 (the doc refuses 7.0 for an int),
// rounds integers beyond 2^53, and has no depth limit.
class JsonFloat {
  constructor(value) { this.value = value; }
}

export function parseJson(text, { markFloats = true, maxDepth = MAX_JSON_DEPTH } = {}) {
  let i = 0;
  const fail = (what) => { throw new ProtocolError("bad_json", `not JSON: ${what} at ${i}`); };
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const value = (depth) => {
    ws();
    const c = text[i];
    if (c === "{" || c === "[") {
      if (depth + 1 > maxDepth) throw new ProtocolError("bad_message", `JSON nested deeper than ${maxDepth}`);
      return c === "{" ? object(depth + 1) : array(depth + 1);
    }
    if (c === '"') return string();
    if (c === "-" || (c >= "0" && c <= "9")) return number();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    return fail("unexpected character");
  };
  const object = (depth) => {
    const out = {};
    i++; ws();
    if (text[i] === "}") { i++; return out; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail("expected a key");
      const key = string();
      ws();
      if (text[i++] !== ":") fail("expected ':'");
      out[key] = value(depth);
      ws();
      const c = text[i++];
      if (c === "}") return out;
      if (c !== ",") fail("expected ',' or '}'");
    }
  };
  const array = (depth) => {
    const out = [];
    i++; ws();
    if (text[i] === "]") { i++; return out; }
    for (;;) {
      out.push(value(depth));
      ws();
      const c = text[i++];
      if (c === "]") return out;
      if (c !== ",") fail("expected ',' or ']'");
    }
  };
  const string = () => {
    const start = i;
    i++;
    for (;;) {
      if (i >= text.length) fail("unterminated string");
      const c = text[i];
      if (c === '"') break;
      if (c === "\\") i++;
      else if (c < " ") fail("control character in a string");
      i++;
    }
    i++;
    return JSON.parse(text.slice(start, i)); // escapes exactly as JSON defines them
  };
  const number = () => {
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 6000));
    if (!m) fail("bad number");
    i += m[0].length;
    if (m[2] || m[3]) return markFloats ? new JsonFloat(Number(m[0])) : Number(m[0]);
    const n = Number(m[0]);
    return Number.isSafeInteger(n) ? n : BigInt(m[0]);
  };
  const out = value(0);
  ws();
  if (i !== text.length) fail("trailing characters");
  return out;
}

// Field rules of section 3: [name, type, {required, default, min, max, maxLen, id, values, code}]
const ID = /^[A-Za-z0-9_.-]{1,64}$/; // JS `$` does not match before a final newline without /m
const CHANNELS = ["transcript", "reply", "audio", "face"];
const u32 = (extra = {}) => ({ min: 0, max: U32, ...extra });
const id = (extra = {}) => ({ id: true, ...extra });

export const CLIENT_MESSAGES = {
  hello: [["protocol", "int", { required: true, min: 1, max: 255 }],
    ["client", "string", { default: "", maxLen: 128 }],
    ["token_name", "string", id()], ["token", "string", { maxLen: 256 }]],
  open: [["session", "string", id({ required: true })], ["npc", "string", id({ required: true })],
    ["sample_rate", "int", { default: 16000, min: 1, max: 192000, code: "bad_sample_rate" }],
    ["channels", "int", { default: 1, min: 1, max: 8, code: "bad_channels" }],
    ["format", "string", { default: "s16le", values: ["s16le", "f32le"], code: "unsupported_format" }],
    ["persona", "string", id()], ["player", "string", id()],
    ["endpoint", "string", { default: "vad", values: ["vad", "client"] }]],
  end_of_utterance: [["session", "string", id({ required: true })]],
  ready: [["session", "string", id({ required: true })], ["turn", "int", u32({ required: true })],
    ["segment", "int", u32({ required: true })]],
  interrupt: [["session", "string", id({ required: true })],
    ["played_samples", "int", { min: 0, max: U53 }]],
  resume: [["session", "string", id({ required: true })], ["sid", "string", id({ required: true })],
    ["resume_secret", "string", { required: true, maxLen: 256 }],
    ["turn", "int", u32({ default: 0 })], ["last", "channels", { default: {} }],
    ["mic_seq", "int", u32()]],
  close: [["session", "string", id({ required: true })]],
  ping: [["id", "int", u32()]],
};

const req = { required: true };
export const SERVER_MESSAGES = {
  welcome: [["protocol", "int", req], ["server", "string", req], ["max_frame_bytes", "int", req],
    ["max_sessions", "int", req], ["npcs", "strings", req], ["token_name", "string", {}]],
  opened: [["session", "string", req], ["channel", "int", { required: true, min: 1, max: 65535 }],
    ["sid", "string", req], ["npc", "string", req], ["persona", "string", req],
    ["voice", "string", req], ["reply_sample_rate", "int", req],
    ["next_mic_seq", "int", u32(req)], ["resumed", "bool", req], ["resume_secret", "string", {}]],
  transcript: [["session", "string", req], ["turn", "int", u32(req)], ["seq", "int", u32(req)],
    ["text", "string", req], ["final", "bool", req], ["start_sample", "int", { min: 0, max: U53 }],
    ["end_sample", "int", { min: 0, max: U53 }]],
  reply: [["session", "string", req], ["turn", "int", u32(req)], ["seq", "int", u32(req)],
    ["segment", "int", u32(req)], ["text", "string", req], ["final", "bool", req]],
  turn_done: [["session", "string", req], ["turn", "int", u32(req)],
    ["audio_samples", "int", { required: true, min: 0, max: U53 }],
    ["face_frames", "int", u32(req)], ["segments", "int", u32(req)], ["interrupted", "bool", req],
    ["no_speech", "bool", req],
    ["timings", "numbers", {}]],
  stop: [["session", "string", req], ["turn", "int", u32(req)]],
  taken_over: [["session", "string", req]],
  error: [["code", "string", req], ["message", "string", req], ["session", "string", {}],
    ["turn", "int", u32()], ["suppressed", "int", u32()]],
  closed: [["session", "string", req]],
  pong: [["id", "int", u32()]],
};

const isInt = (v) => (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
const isNumber = (v) => typeof v === "number" || typeof v === "bigint" || v instanceof JsonFloat;
const plain = (v) => (v instanceof JsonFloat ? v.value : v);
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof JsonFloat);

function checkType(type, v) {
  switch (type) {
    case "int": return isInt(v);
    case "string": return typeof v === "string";
    case "bool": return typeof v === "boolean";
    case "strings": return Array.isArray(v) && v.every((s) => typeof s === "string");
    case "numbers": return isObject(v) && Object.values(v).every(isNumber);
    case "channels": return isObject(v) && Object.values(v).every(isInt);
    default: return false;
  }
}

function checkRules(msgType, name, rules, v) {
  const bad = (why) => new ProtocolError(rules.code || "bad_message", `${msgType}.${name}: ${why}`);
  if (rules.min !== undefined && isInt(v) && (v < rules.min || v > rules.max)) {
    throw bad(`${String(v).slice(0, 40)} is outside ${rules.min}..${rules.max}`);
  }
  if (rules.values && !rules.values.includes(v)) throw bad(`${String(v).slice(0, 40)} is not one of ${rules.values.join(", ")}`);
  if (rules.id && !ID.test(v)) throw new ProtocolError("bad_message", `${msgType}.${name}: not an id (1 to 64 of A-Z a-z 0-9 _ . -)`);
  if (rules.maxLen !== undefined && [...v].length > rules.maxLen) throw bad(`longer than ${rules.maxLen} characters`);
}

function checkChannels(msgType, name, v) {
  for (const [k, n] of Object.entries(v)) {
    if (!CHANNELS.includes(k)) throw new ProtocolError("bad_message", `${msgType}.${name}: unknown channel ${k.slice(0, 40)}`);
    if (n < 0 || n > U32) throw new ProtocolError("bad_message", `${msgType}.${name}.${k}: outside 0..${U32}`);
  }
}

/**
 * A message object checked against its field table: for client messages, unknown fields are
 * refused and defaults filled in; for server messages, unknown fields are ignored.
 */
export function validate(data, registry, { strict }) {
  if (!isObject(data)) throw new ProtocolError("bad_message", "a message is a JSON object");
  if (typeof data.type !== "string") throw new ProtocolError("bad_message", "a message needs a string type");
  const fields = registry[data.type];
  if (!fields) throw new ProtocolError("unknown_type", `unknown message type ${data.type.slice(0, 40)}`);
  const known = new Set(["type", ...fields.map((f) => f[0])]);
  if (strict) {
    for (const k of Object.keys(data)) {
      if (!known.has(k)) throw new ProtocolError("bad_message", `${data.type}: unknown field ${k.slice(0, 40)}`);
    }
  }
  const out = { type: data.type };
  for (const [name, type, rules] of fields) {
    let v = data[name];
    const optional = !rules.required && rules.default === undefined;
    if (v === undefined || (v === null && optional)) {
      if (rules.required) throw new ProtocolError("bad_message", `${data.type}: missing ${name}`);
      if (rules.default !== undefined) out[name] = structuredClone(rules.default);
      continue;
    }
    if (!checkType(type, v)) throw new ProtocolError("bad_message", `${data.type}.${name}: not a ${type}`);
    checkRules(data.type, name, rules, v);
    if (type === "channels") checkChannels(data.type, name, v);
    if (type === "numbers") v = Object.fromEntries(Object.entries(v).map(([k, x]) => [k, Number(plain(x))]));
    out[name] = v;
  }
  return out;
}

/** Decodes a text frame from the server (unknown fields ignored, as the doc asks of clients). */
export function decodeServer(text) {
  return validate(parseJson(text), SERVER_MESSAGES, { strict: false });
}

/** Decodes a text frame as the gateway would: the error codes of section 7. */
export function decodeClient(text) {
  const msg = validate(parseJson(text), CLIENT_MESSAGES, { strict: true });
  if (msg.type === "hello" && msg.protocol !== PROTOCOL_VERSION) {
    throw new ProtocolError("unsupported_protocol", `protocol ${msg.protocol} is not supported; this server speaks ${PROTOCOL_VERSION}`);
  }
  return msg;
}

/** A client message as its text frame; refused (ProtocolError) if the gateway would refuse it. */
export function encodeClient(msg) {
  const checked = validate(msg, CLIENT_MESSAGES, { strict: true });
  const out = {};
  for (const k of Object.keys(msg)) if (msg[k] !== undefined && msg[k] !== null) out[k] = checked[k];
  return JSON.stringify(out);
}
