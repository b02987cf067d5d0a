// AudioWorklet: hands the mic's 128-sample render quanta to the page, channel 0 only (the page
// opens a mono session). Runs on the audio thread, so it does nothing else.
class MicTap extends AudioWorkletProcessor {
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) this.port.postMessage(ch.slice(0));
    return true;
  }
}
registerProcessor("parley-mic", MicTap);
