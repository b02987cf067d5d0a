// The playground's JavaScript codec (gateway/playground/protocol.js) against the conformance
// vectors the Python codec generates (clients/vectors/protocol-vectors.json).
// Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  decodeClient, decodeFrame, decodeServer, encodeClient, encodeMic, FACE_NAMES, parseJson,
  ProtocolError,
} from "../../gateway/playground/protocol.js";

const root = new URL("../../", import.meta.url);
// our parser: the vectors hold integers beyond 2^53 (read exactly, as BigInt)
const vectors = parseJson(readFileSync(new URL("clients/vectors/protocol-vectors.json", root), "utf8"),
  { markFloats: false, maxDepth: 64 });
const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (u8) => Array.from(u8, (b) => b.toString(16).padStart(2, "0")).join("");
const big = (v) => BigInt(v);

function errorCode(fn) {
  try {
    fn();
  } catch (e) {
    if (e instanceof ProtocolError) return e.code;
    throw e;
  }
  return null;
}

test("every binary vector decodes as expected, or with the expected error code", () => {
  assert.ok(vectors.binary.length >= 20);
  for (const v of vectors.binary) {
    if (v.error) {
      assert.equal(errorCode(() => decodeFrame(hex(v.hex))), v.error, v.name);
      continue;
    }
    const f = decodeFrame(hex(v.hex).buffer);
    for (const [k, want] of Object.entries(v.expect)) {
      if (k === "pcm") assert.equal(toHex(f.pcm), want, v.name);
      else if (k === "records") {
        assert.equal(f.records.length, want.length, v.name);
        want.forEach((r, i) => {
          assert.equal(big(f.records[i].sample), big(r.sample), `${v.name} record ${i}`);
          assert.deepEqual(Array.from(f.records[i].values), r.values.map(Math.fround), v.name);
        });
      } else assert.equal(big(f[k]), big(want), `${v.name}.${k}`);
    }
  }
});

test("a mic frame this codec encodes is byte for byte the vector's", () => {
  for (const v of vectors.binary.filter((x) => x.name.startsWith("mic_audio.") && x.expect)) {
    const e = v.expect;
    assert.equal(toHex(encodeMic(Number(e.channel), Number(e.seq), hex(e.pcm))), v.hex, v.name);
  }
});

function normal(x) { // BigInt and Number compare by value
  if (typeof x === "bigint") return Number.isSafeInteger(Number(x)) ? Number(x) : x.toString();
  if (Array.isArray(x)) return x.map(normal);
  if (x && typeof x === "object") return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, normal(v)]));
  return x;
}

test("every JSON vector, both ways: the expected message or the gateway's error code", () => {
  let checked = 0;
  for (const v of vectors.json) {
    const decode = v.direction === "client->server" ? decodeClient : decodeServer;
    if (v.error) {
      assert.equal(errorCode(() => decode(v.text)), v.error, `${v.name}: ${v.text.slice(0, 120)}`);
    } else {
      assert.deepEqual(normal(decode(v.text)), normal(v.expect), v.name);
      if (v.direction === "client->server") { // what we send, the gateway reads the same way
        assert.deepEqual(normal(decodeClient(encodeClient(v.expect))), normal(v.expect), v.name);
      }
    }
    checked++;
  }
  assert.ok(checked > 500, `only ${checked} JSON vectors`);
});

test("encodeClient refuses what the gateway would refuse, before it is sent", () => {
  assert.equal(errorCode(() => encodeClient({ type: "ready", session: "npc 1", turn: 1, segment: 0 })), "bad_message");
  assert.equal(errorCode(() => encodeClient({ type: "open", session: "a", npc: "guard", format: "s24le" })), "unsupported_format");
  assert.equal(encodeClient({ type: "end_of_utterance", session: "a" }), '{"type":"end_of_utterance","session":"a"}');
});

test("face names follow the doc's table (61, EARFaceBlendShape order)", () => {
  assert.equal(FACE_NAMES.length, 61);
  assert.equal(FACE_NAMES[17], "JawOpen");
  assert.equal(FACE_NAMES[60], "RightEyeRoll");
});
