// The microphone: an AudioWorklet taps it on the AudioContext's clock, and this cuts 20 ms
// chunks of s16le at the context's rate (the gateway resamples whatever rate `open` names).

export class Mic {
  constructor(ctx, onChunk) {
    this.ctx = ctx;
    this.onChunk = onChunk; // (Int16Array of 20 ms, rms 0..1)
    this.rate = ctx.sampleRate;
    this.chunk = new Int16Array(Math.round(this.rate / 50));
    this.fill = 0;
    this.sumSq = 0;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await this.ctx.audioWorklet.addModule(new URL("./mic-worklet.js", import.meta.url));
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "parley-mic", { numberOfInputs: 1, numberOfOutputs: 0 });
    this.node.port.onmessage = (e) => this.push(e.data);
    this.source.connect(this.node);
    return this;
  }

  push(block) {
    for (let i = 0; i < block.length; i++) {
      const x = Math.max(-1, Math.min(1, block[i]));
      this.chunk[this.fill++] = x < 0 ? x * 32768 : x * 32767;
      this.sumSq += x * x;
      if (this.fill === this.chunk.length) {
        this.onChunk(this.chunk.slice(), Math.sqrt(this.sumSq / this.fill));
        this.fill = 0;
        this.sumSq = 0;
      }
    }
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.source) this.source.disconnect();
  }
}
