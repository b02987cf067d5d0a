import asyncio
import struct
import time

import numpy as np
import pytest

from gateway.livelink import (
    PACKET_VERSION,
    LiveLinkPlayer,
    LiveLinkSchedule,
    LiveLinkSender,
    decode_packet,
    encode_packet,
    frame_time,
    parse_target,
)
from schemas.arkit import INDEX, NUM_FACE_VALUES


def frame(seed: float = 0.0) -> list[float]:
    # float32-exact values, so a round trip compares with ==
    return [float(np.float32(seed + i / 64)) for i in range(NUM_FACE_VALUES)]


def test_round_trip():
    vals = frame(0.25)
    data = encode_packet("Parley/npc-1.s1", "npc-1.s1", 1234, 0.5, 60, 1, vals)
    p = decode_packet(data)
    assert (p.version, p.device_id, p.subject) == (PACKET_VERSION, "Parley/npc-1.s1", "npc-1.s1")
    assert (p.frame_number, p.subframe, p.rate_num, p.rate_den) == (1234, 0.5, 60, 1)
    assert list(p.values) == vals and len(p.values) == 61


def test_exact_bytes_match_the_big_endian_layout():
    vals = [0.0] * NUM_FACE_VALUES
    vals[INDEX["JawOpen"]] = 1.0
    vals[INDEX["HeadYaw"]] = -0.5
    data = encode_packet("dev", "Guard", 7, 0.25, 60, 1, vals)
    expected = (
        struct.pack(">B", 6)
        + struct.pack(">i", 3) + b"dev"
        + struct.pack(">i", 5) + b"Guard"
        + struct.pack(">i", 7) + struct.pack(">f", 0.25)
        + struct.pack(">i", 60) + struct.pack(">i", 1)
        + struct.pack(">B", 61)
        + b"".join(struct.pack(">f", v) for v in vals)
    )
    assert data == expected
    # spelled out by hand: version, length 3 big-endian, "dev", ... count 61 (0x3d)
    assert data[:8] == b"\x06\x00\x00\x00\x03dev"
    assert data[17:33] == bytes.fromhex("00000007" "3e800000" "0000003c" "00000001")
    assert data[33] == 0x3D
    jaw = 34 + 4 * INDEX["JawOpen"]
    assert data[jaw:jaw + 4] == bytes.fromhex("3f800000")
    assert len(data) == 1 + 4 + 3 + 4 + 5 + 16 + 1 + 4 * 61


def test_shortest_packet_still_passes_unreals_minimum_size():
    # Unreal drops datagrams not longer than 1 + 16 + 1 + 61*4 + 2*sizeof(TCHAR) (TCHAR <= 4)
    assert len(encode_packet("a", "b", 0, 0.0, 60, 1, frame())) > 1 + 16 + 1 + 244 + 8


@pytest.mark.parametrize("n", [0, 52, 60, 62])
def test_exactly_61_values(n):
    with pytest.raises(ValueError, match="61"):
        encode_packet("d", "s", 0, 0.0, 60, 1, [0.0] * n)


def test_bad_packets_are_refused():
    good = encode_packet("d", "s", 0, 0.0, 60, 1, frame())
    with pytest.raises(ValueError, match="version"):
        decode_packet(b"\x05" + good[1:])
    with pytest.raises(ValueError, match="truncated"):
        decode_packet(good[:-1])
    with pytest.raises(ValueError, match="after the values"):
        decode_packet(good + b"\x00")
    count_at = 1 + 4 + 1 + 4 + 1 + 16
    with pytest.raises(ValueError, match="count"):
        decode_packet(good[:count_at] + b"\x34" + good[count_at + 1:])
    with pytest.raises(ValueError, match="truncated"):
        decode_packet(b"\x06" + struct.pack(">i", -1) + good[5:])
    for dev, subj in (("", "s"), ("d", ""), ("x" * 257, "s")):
        with pytest.raises(ValueError):
            encode_packet(dev, subj, 0, 0.0, 60, 1, frame())
    with pytest.raises(ValueError, match="subframe"):
        encode_packet("d", "s", 0, 1.0, 60, 1, frame())


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:11111", ("127.0.0.1", 11111)),
    (" ue-box.lan:9000 ", ("ue-box.lan", 9000)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:11111", ("::1", 11111)),
])
def test_good_targets(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "host", "host:", ":11111", "host:0", "host:65536", "host:abc", "host:1x",
    "a b:1", "http://host:1", "host:1/path", "::1:11111", "[1.2.3.4]:1", "[ue-box]:1",
    "999.1.1.1:1", "0.0.0.0:11111", "[::]:11111", "h$t:1", "-host:1",
])
def test_bad_targets_are_refused(text):
    with pytest.raises(ValueError, match="Live Link target"):
        parse_target(text)


def test_frame_time_is_exact():
    assert frame_time(0, 22050, 60) == (0, 0.0)
    assert frame_time(368, 22050, 60) == (1, 30 / 22050)
    assert frame_time(22050, 22050, 60) == (60, 0.0)


def test_schedule_releases_each_frame_at_t0_plus_sample_over_rate():
    rate = 22050
    samples = [round(i * rate / 60) for i in range(6)]
    vals = np.arange(6 * 61, dtype=np.float32).reshape(6, 61)
    sch = LiveLinkSchedule(rate)
    sch.add(samples, vals)
    assert sch.due(1e9) == [] and sch.next_time() is None  # nothing before start
    t0 = 100.0
    sch.start(t0)
    sch.start(t0 + 5)  # a second ready does not restart the clock
    for i, s in enumerate(samples):
        t = t0 + s / rate
        assert sch.next_time() == pytest.approx(t)
        if i:
            assert sch.due(t - 1e-4) == []  # not a moment early
        got = sch.due(t)
        assert [f.sample for f in got] == [s]
        # the exact audio position: sample 1102 (frame 3, rounded half-even) is frame 2.9986
        assert (got[0].frame_number, got[0].subframe) == frame_time(s, rate, 60)
        assert abs(got[0].frame_number + got[0].subframe - i) < 0.01
        assert np.array_equal(got[0].values, vals[i])
    assert not sch.exhausted  # more may come until finish()
    sch.add([rate], np.ones((1, 61), np.float32))  # a later segment, after the start
    assert sch.due(t0 + 0.5) == []
    assert [f.frame_number for f in sch.due(t0 + 1.0)] == [60]
    sch.finish()
    assert sch.exhausted and sch.dropped == 0


def test_schedule_drops_stale_frames_after_a_stall():
    sch = LiveLinkSchedule(1000, max_late_s=0.1)
    sch.add([0, 10, 500, 990], np.zeros((4, 61), np.float32))
    sch.start(0.0)
    got = sch.due(1.0)  # woke a second late: only the frame within 0.1 s is still worth it
    assert [f.sample for f in got] == [990] and sch.dropped == 3


class Receiver(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((time.monotonic(), data))


async def test_udp_round_trip_on_loopback():
    loop = asyncio.get_running_loop()
    transport, rx = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        async with LiveLinkSender(parse_target(f"127.0.0.1:{port}")) as tx:
            tx.send("npc-1.s1", 5, frame(0.5), subframe=0.25)
            _, data = await asyncio.wait_for(rx.queue.get(), 2)
            p = decode_packet(data)
            assert (p.subject, p.device_id) == ("npc-1.s1", "Parley/npc-1.s1")
            assert (p.frame_number, p.subframe, p.rate_num, p.rate_den) == (5, 0.25, 60, 1)
            assert list(p.values) == frame(0.5)

            # paced: frames at 0, 20 and 40 ms of audio, one arriving after the start
            rate = 1000
            player = LiveLinkPlayer(tx, "npc-2.s7", rate)
            player.add([0, 20], np.stack([frame(1), frame(2)]))
            task = asyncio.create_task(player.run())
            await asyncio.sleep(0.01)
            assert rx.queue.empty()  # no frame before UE's ready starts the clock
            t0 = time.monotonic()
            player.start(t0)
            await asyncio.sleep(0.005)
            player.add([40], np.array([frame(3)]))
            player.finish()
            assert await asyncio.wait_for(task, 2) == 3
            got = [await asyncio.wait_for(rx.queue.get(), 2) for _ in range(3)]
            for (arrived, data), sample, seed in zip(got, (0, 20, 40), (1, 2, 3), strict=True):
                p = decode_packet(data)
                assert p.subject == "npc-2.s7" and list(p.values) == frame(seed)
                assert p.frame_number == sample * 60 // rate
                assert arrived >= t0 + sample / rate - 1e-3  # never early
    finally:
        transport.close()
