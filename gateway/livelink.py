"""Live Link Face over UDP: face frames to Unreal's "Live Link Face" (Apple ARKit) source.

Checked against Unreal Engine's receiver, ``FAppleARKitLiveLinkRemoteListener::Tick`` in
Engine/Plugins/Runtime/AR/AppleAR/AppleARKitFaceSupport/Source/AppleARKitFaceSupport/Private/
AppleARKitLiveLinkSource.cpp (repository unicorn2022/UE5.8.0), and the network-byte-order
serializer it reads with, ``FNboSerializeFromBuffer`` in AppleARKitLiveLinkSource.h of the same
folder (repository izzy2lost/UnrealEngineUWP). A packet, every number big-endian:

    uint8    BLEND_SHAPE_PACKET_VER, must be 6 or the packet is dropped
    FName    device id: int32 byte length, then that many UTF-8 bytes (no terminator)
    FName    subject name: same
    FQualifiedFrameTime: int32 frame number, float32 subframe, int32 rate numerator,
             int32 rate denominator
    uint8    blendshape count, must equal EARFaceBlendShape::MAX (61) or the packet is dropped
    float32  x 61, in EARFaceBlendShape order (schemas/arkit.py)

Two receiver details shape this module. The listener only accepts a datagram longer than
MIN_BLEND_SHAPE_PACKET_SIZE (the fixed part plus ``2 * sizeof(TCHAR)``), so both names must be
non-empty; and its buffer is MAX_BLEND_SHAPE_PACKET_SIZE (``256 * sizeof(TCHAR)`` per name), so
each name is capped at 256 bytes. And ``FAppleARKitLiveLinkSource::PublishBlendShapes`` keeps one
subject per device id: a device whose packets change subject has its previous subject removed.
One device id therefore carries one subject, so LiveLinkSender puts the subject into the device id
it sends (``<device_id>/<subject>``); otherwise two NPCs would evict each other every frame.

Sans-I/O: encode_packet, decode_packet, parse_target and LiveLinkSchedule do no I/O; only
LiveLinkSender and LiveLinkPlayer touch the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from schemas.arkit import NUM_FACE_VALUES

PACKET_VERSION = 6
DEFAULT_PORT = 11111  # the Live Link Face app's default target port
MAX_NAME_BYTES = 256

_HEAD = struct.Struct(">B")
_LEN = struct.Struct(">i")
_FRAME_TIME = struct.Struct(">ifii")
_COUNT = struct.Struct(">B")
_VALUES = struct.Struct(f">{NUM_FACE_VALUES}f")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


@dataclass(frozen=True)
class LiveLinkPacket:
    version: int
    device_id: str
    subject: str
    frame_number: int
    subframe: float
    rate_num: int
    rate_den: int
    values: tuple[float, ...]


def _name(label: str, text: str) -> bytes:
    raw = text.encode("utf-8")
    if not raw:
        raise ValueError(f"{label} must not be empty: Unreal drops packets this short")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"{label} is {len(raw)} bytes; Unreal's buffer holds {MAX_NAME_BYTES}")
    return _LEN.pack(len(raw)) + raw


def encode_packet(device_id: str, subject: str, frame_number: int, subframe: float,
                  rate_num: int, rate_den: int, values: Sequence[float]) -> bytes:
    """One Live Link Face datagram (packet version 6); see the module docstring for the layout."""
    if len(values) != NUM_FACE_VALUES:
        raise ValueError(f"a face frame has {NUM_FACE_VALUES} values, got {len(values)}")
    if not 0.0 <= subframe < 1.0:
        raise ValueError(f"subframe must be in [0, 1), got {subframe}")
    if rate_num <= 0 or rate_den <= 0:
        raise ValueError(f"frame rate must be positive, got {rate_num}/{rate_den}")
    return b"".join((
        _HEAD.pack(PACKET_VERSION),
        _name("device id", device_id),
        _name("subject", subject),
        _FRAME_TIME.pack(frame_number, subframe, rate_num, rate_den),
        _COUNT.pack(NUM_FACE_VALUES),
        _VALUES.pack(*(float(v) for v in values)),
    ))


def decode_packet(data: bytes) -> LiveLinkPacket:
    """Parse one datagram; ValueError for anything Unreal's listener would not accept."""
    view = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise ValueError(f"packet truncated in {what} ({len(view)} bytes)")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    (version,) = _HEAD.unpack(take(_HEAD.size, "version"))
    if version != PACKET_VERSION:
        raise ValueError(f"packet version {version}, expected {PACKET_VERSION}")
    names = []
    for what in ("device id", "subject"):
        (n,) = _LEN.unpack(take(_LEN.size, what))
        try:
            names.append(bytes(take(n, what)).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} is not UTF-8") from exc
    frame, sub, num, den = _FRAME_TIME.unpack(take(_FRAME_TIME.size, "frame time"))
    (count,) = _COUNT.unpack(take(_COUNT.size, "blendshape count"))
    if count != NUM_FACE_VALUES:
        raise ValueError(f"blendshape count {count}, expected {NUM_FACE_VALUES}")
    values = _VALUES.unpack(take(_VALUES.size, "values"))
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} bytes after the values")
    return LiveLinkPacket(version, names[0], names[1], frame, sub, num, den, values)


def parse_target(text: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) from configuration -> ``(host, port)``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Live Link target is empty; expected HOST:PORT, e.g. 127.0.0.1:11111")
    s = text.strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", s) or re.fullmatch(r"([^:\s\[\]]+):(\d{1,5})", s)
    if m is None:
        raise ValueError(f"Live Link target {text!r} is not HOST:PORT "
                         "(IPv6 in brackets: [::1]:11111)")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"Live Link target {text!r}: port must be 1..65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if s.startswith("[") or not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(f"Live Link target {text!r}: {host!r} is not an IP address "
                             "or host name") from None
        return host, port
    if s.startswith("[") != (ip.version == 6):
        raise ValueError(f"Live Link target {text!r}: IPv6 addresses go in brackets, "
                         "IPv4 addresses do not")
    if ip.is_unspecified:
        raise ValueError(f"Live Link target {text!r}: {host} is a bind address, not a "
                         "destination; give the Unreal machine's address")
    return host, port


def frame_time(sample: int, rate: int, fps: int) -> tuple[int, float]:
    """Reply-audio sample -> (frame number, subframe) at ``fps``, in exact integers first."""
    frame, rem = divmod(int(sample) * fps, rate)
    return frame, rem / rate


# --------------------------------------------------------------------------- pacing


class LiveLinkFrame(NamedTuple):
    sample: int
    frame_number: int
    subframe: float
    values: np.ndarray  # float32 (61,)


class LiveLinkSchedule:
    """Face frames of one turn, released when the reply-audio clock reaches them.

    The clock starts at ``start(now)`` (UE's first ``ready`` of the turn: it is about to play
    sample 0), so the frame for sample ``s`` is due at ``t0 + s / rate``. Frames may be added
    before or after the start, as the lipsync worker produces them; ``finish()`` says no more
    will come. A frame whose time has passed by more than ``max_late_s`` when it is first seen
    is dropped (and counted): after a stall, replaying a burst of stale frames would flicker the
    face, while skipping to the present keeps it on the audio.
    """

    def __init__(self, rate: int, fps: int = 60, max_late_s: float | None = 0.25):
        if rate <= 0 or fps <= 0:
            raise ValueError("rate and fps must be positive")
        self.rate = int(rate)
        self.fps = int(fps)
        self.max_late_s = max_late_s
        self.t0: float | None = None
        self.finished = False
        self.dropped = 0
        self._frames: list[tuple[int, np.ndarray]] = []
        self._next = 0

    @property
    def started(self) -> bool:
        return self.t0 is not None

    @property
    def exhausted(self) -> bool:
        """Finished and every frame released or dropped: the pacer can stop."""
        return self.finished and self._next >= len(self._frames)

    def add(self, samples: Sequence[int] | np.ndarray, values: np.ndarray) -> None:
        vals = np.asarray(values, dtype=np.float32).reshape(-1, NUM_FACE_VALUES)
        smp = np.asarray(samples, dtype=np.int64).reshape(-1)
        if len(smp) != len(vals):
            raise ValueError(f"{len(smp)} samples for {len(vals)} face frames")
        tail_start = self._frames[-1][0] if self._frames else None
        self._frames.extend((int(s), v) for s, v in zip(smp, vals, strict=True))
        if tail_start is not None and len(smp) and int(smp.min()) < tail_start:
            # out of order (not expected from the worker): keep the unreleased part sorted
            self._frames[self._next:] = sorted(self._frames[self._next:], key=lambda f: f[0])

    def start(self, now: float) -> None:
        if self.t0 is None:  # a repeated ready must not restart the clock
            self.t0 = now

    def finish(self) -> None:
        self.finished = True

    def due_time(self, sample: int) -> float:
        if self.t0 is None:
            raise RuntimeError("the schedule has not been started")
        return self.t0 + sample / self.rate

    def next_time(self) -> float | None:
        """When the next frame is due; None before start or with nothing queued."""
        if self.t0 is None or self._next >= len(self._frames):
            return None
        return self.due_time(self._frames[self._next][0])

    def due(self, now: float) -> list[LiveLinkFrame]:
        out: list[LiveLinkFrame] = []
        if self.t0 is None:
            return out
        while self._next < len(self._frames):
            sample, values = self._frames[self._next]
            t = self.due_time(sample)
            if t > now + 1e-9:
                break
            self._next += 1
            if self.max_late_s is not None and now - t > self.max_late_s:
                self.dropped += 1
                continue
            frame, sub = frame_time(sample, self.rate, self.fps)
            out.append(LiveLinkFrame(sample, frame, sub, values))
        return out


# --------------------------------------------------------------------------- asyncio


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.errors = 0

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while Unreal is not listening: UDP is fire-and-forget, go on
        self.errors += 1


class LiveLinkSender:
    """One UDP socket to the configured Live Link target; one subject per NPC session.

    ``target`` comes from configuration (``parse_target``), never from a client: a client that
    could choose it could aim the gateway's datagrams at any host.
    """

    def __init__(self, target: tuple[str, int], device_id: str = "Parley", fps: int = 60):
        self.target = target
        self.device_id = device_id
        self.fps = fps
        self.sent = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _Protocol | None = None

    @property
    def errors(self) -> int:
        return self._protocol.errors if self._protocol else 0

    async def open(self) -> LiveLinkSender:
        loop = asyncio.get_running_loop()
        self._transport, self._protocol = await loop.create_datagram_endpoint(
            _Protocol, remote_addr=self.target)
        return self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> LiveLinkSender:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        self.close()

    def wire_device_id(self, subject: str) -> str:
        return f"{self.device_id}/{subject}"  # one subject per device id; see module docstring

    def send(self, subject: str, frame_number: int, values: Sequence[float],
             subframe: float = 0.0) -> None:
        if self._transport is None:
            raise RuntimeError("LiveLinkSender is not open")
        packet = encode_packet(self.wire_device_id(subject), subject, frame_number, subframe,
                               self.fps, 1, values)
        self._transport.sendto(packet)
        self.sent += 1


class LiveLinkPlayer:
    """Drives one LiveLinkSchedule over a sender: ``run()`` sleeps until the next due frame.

    ``add``/``start``/``finish`` may be called from any coroutine on the loop; each wakes the
    pacer so that frames arriving after the start are not held until a timeout.
    """

    def __init__(self, sender: LiveLinkSender, subject: str, rate: int,
                 clock: Callable[[], float] = time.monotonic, max_late_s: float | None = 0.25):
        self.sender = sender
        self.subject = subject
        self.clock = clock
        self.schedule = LiveLinkSchedule(rate, fps=sender.fps, max_late_s=max_late_s)
        self._wake = asyncio.Event()
        # Frame numbers are turn-relative; the owner sets this when playback starts so a
        # subject's frame times run on one timeline across idle and speech.
        self.frame_offset = 0

    def add(self, samples: Sequence[int] | np.ndarray, values: np.ndarray) -> None:
        self.schedule.add(samples, values)
        self._wake.set()

    def start(self, now: float | None = None) -> None:
        self.schedule.start(self.clock() if now is None else now)
        self._wake.set()

    def finish(self) -> None:
        self.schedule.finish()
        self._wake.set()

    async def run(self) -> int:
        """Send every frame on time; returns how many were sent once the schedule is done."""
        sent = 0
        while True:
            for f in self.schedule.due(self.clock()):
                self.sender.send(self.subject, f.frame_number + self.frame_offset,
                                 f.values.tolist(), f.subframe)
                sent += 1
            if self.schedule.exhausted:
                return sent
            self._wake.clear()
            nxt = self.schedule.next_time()
            delay = None if nxt is None else max(0.0, nxt - self.clock())
            if delay == 0.0:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

