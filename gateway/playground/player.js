// Reply audio on Web Audio's own clock, face records pinned to it by their sample stamps
// (docs/protocol.md, section 5). One timeline per turn: sample 0 plays at `t0` (context time),
// chunk k at t0 + sample/rate. A chunk that comes after its time (the buffer ran dry) moves t0
// on: every earlier chunk has finished by then, so nothing already scheduled moves.

const LEAD_S = 0.12; // buffer before the first sample plays
const READY_BEFORE_S = 0.1; // `ready` this long before a segment starts (as UE does)

export class ReplyPlayer {
  constructor(ctx, onReady) {
    this.ctx = ctx;
    this.onReady = onReady; // (key, turn, segment): a segment is buffered and about to play
    this.turns = new Map();
    this.out = ctx.createGain();
    this.out.connect(ctx.destination);
  }

  turn(key) {
    let t = this.turns.get(key);
    if (!t) {
      t = { key, t0: null, rate: 0, end: 0, sources: new Set(), faces: [], ready: new Set(),
        stopped: false, underruns: 0, scheduledS: 0, firstAt: null };
      this.turns.set(key, t);
    }
    return t;
  }

  audio(key, f) {
    const t = this.turn(key);
    if (t.stopped) return;
    const n = f.pcm.byteLength >> 1;
    const rate = f.sample_rate;
    const now = this.ctx.currentTime;
    t.rate = rate;
    if (t.t0 === null) { t.t0 = now + LEAD_S - Number(f.sample) / rate; t.firstAt = now; }
    let at = t.t0 + Number(f.sample) / rate;
    if (at < now + 0.01) { // underrun: the timeline moves on, the gap is heard as silence
      const slip = now + 0.01 - at;
      t.t0 += slip; at += slip; t.underruns++;
    }
    if (n > 0) {
      const buf = this.ctx.createBuffer(1, n, rate);
      const pcm = new DataView(f.pcm.buffer, f.pcm.byteOffset, f.pcm.byteLength);
      const ch = buf.getChannelData(0);
      for (let i = 0; i < n; i++) ch[i] = pcm.getInt16(2 * i, true) / 32768;
      const src = this.ctx.createBufferSource();
      src.buffer = buf;
      src.connect(this.out);
      src.start(at);
      t.sources.add(src);
      src.onended = () => t.sources.delete(src);
      t.scheduledS += n / rate;
    }
    t.end = Math.max(t.end, Number(f.sample) + n);
    if (!t.ready.has(f.segment)) {
      t.ready.add(f.segment);
      const wait = Math.max(0, (at - now - READY_BEFORE_S) * 1000);
      setTimeout(() => { if (!t.stopped) this.onReady(key, f.turn, f.segment); }, wait);
    }
  }

  face(key, f) {
    const t = this.turn(key);
    if (t.stopped) return;
    for (const r of f.records) t.faces.push({ sample: Number(r.sample), values: r.values });
    const n = t.faces.length;
    if (n > f.records.length && t.faces[n - f.records.length - 1].sample > t.faces[n - f.records.length].sample) {
      t.faces.sort((a, b) => a.sample - b.sample); // a late segment's frames: keep them in order
    }
  }

  /** Reply samples of this turn the device has played (what the player heard). */
  played(key) {
    const t = this.turns.get(key);
    if (!t || t.t0 === null) return 0;
    const heard = this.ctx.currentTime - (this.ctx.outputLatency || 0);
    return Math.max(0, Math.min(t.end, Math.floor((heard - t.t0) * t.rate)));
  }

  /** The turn whose audio is playing now, if any. */
  playing() {
    const now = this.ctx.currentTime - (this.ctx.outputLatency || 0);
    for (const t of [...this.turns.values()].reverse()) {
      if (!t.stopped && t.t0 !== null && now >= t.t0 && now < t.t0 + t.end / t.rate) return t;
    }
    return null;
  }

  /** The face at a sample position: the record at or before it, blended toward the next. */
  faceAt(t, pos) {
    const f = t.faces;
    if (!f.length || pos < f[0].sample) return null;
    let lo = 0, hi = f.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (f[mid].sample <= pos) lo = mid; else hi = mid - 1;
    }
    const a = f[lo], b = f[lo + 1];
    if (!b || b.sample <= a.sample) return a.values;
    const w = Math.min(1, (pos - a.sample) / (b.sample - a.sample));
    const out = new Float32Array(a.values.length);
    for (let i = 0; i < out.length; i++) out[i] = a.values[i] + (b.values[i] - a.values[i]) * w;
    return out;
  }

  /** Stop a turn at once; returns the samples played. */
  stop(key) {
    const t = this.turns.get(key);
    if (!t) return 0;
    const played = this.played(key);
    t.stopped = true;
    for (const s of t.sources) { try { s.stop(); } catch { /* not started yet */ } }
    t.sources.clear();
    return played;
  }
}
