// Parley binary frames: a header-only C++17 codec with no dependencies.
//
// Decodes the server's reply-audio (kind 2) and face (kind 3) frames and encodes the client's
// mic-audio frames (kind 1), byte for byte as docs/protocol.md section 4 describes; it decodes
// and encodes all three kinds, so a test (or a mock server) can use it both ways. Integers are
// read and written byte by byte as little-endian, so it needs no packed structs, no alignment
// and works on any host. Decoded frames are views into the caller's buffer: keep it alive
// while using them. The JSON control messages are plain structs in parley_messages.hpp.
//
// Checked against clients/vectors/protocol-vectors.json by conformance_test.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace parley {

enum class FrameKind : uint8_t { MicAudio = 1, ReplyAudio = 2, FaceFrames = 3 };

inline constexpr uint8_t kFlagLastInSegment = 0x01;  // reply audio: last chunk of its segment
inline constexpr size_t kCommonHeaderSize = 4;       // kind, flags, channel
inline constexpr size_t kMicHeaderSize = 8;
inline constexpr size_t kReplyAudioHeaderSize = 28;
inline constexpr size_t kFaceHeaderSize = 20;
inline constexpr size_t kFaceValueCount = 61;  // EARFaceBlendShape order, docs section 4.5
inline constexpr size_t kFaceRecordSize = 8 + 4 * kFaceValueCount;  // u64 sample + 61 f32

// Why a frame was refused; ErrorCode() gives the gateway's error code for the same input.
enum class DecodeError : uint8_t { None, BadAudio, BadMessage };

inline const char* ErrorCode(DecodeError error)
{
    switch (error)
    {
    case DecodeError::None: return "";
    case DecodeError::BadAudio: return "bad_audio";
    case DecodeError::BadMessage: return "bad_message";
    }
    return "bad_message";
}

namespace detail {
inline uint16_t ReadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t ReadU32(const uint8_t* p)
{
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
           (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
inline uint64_t ReadU64(const uint8_t* p)
{
    return static_cast<uint64_t>(ReadU32(p)) | (static_cast<uint64_t>(ReadU32(p + 4)) << 32);
}
inline float ReadF32(const uint8_t* p)
{
    const uint32_t bits = ReadU32(p);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
inline void WriteU16(uint8_t* p, uint16_t v)
{
    p[0] = static_cast<uint8_t>(v);
    p[1] = static_cast<uint8_t>(v >> 8);
}
inline void WriteU32(uint8_t* p, uint32_t v)
{
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void WriteU64(uint8_t* p, uint64_t v)
{
    for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void WriteF32(uint8_t* p, float value)
{
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    WriteU32(p, bits);
}
}  // namespace detail

// Kind 1, client -> server: the player's mic audio in the session's negotiated format.
struct MicAudio
{
    uint8_t flags = 0;
    uint16_t channel = 0;  // the session's channel from `opened`
    uint32_t seq = 0;      // from opened.next_mic_seq, +1 per chunk
    const uint8_t* pcm = nullptr;  // s16le or f32le, channels interleaved
    size_t pcm_size = 0;           // bytes
};

// Kind 2, server -> client: the NPC's voice, mono s16le.
struct ReplyAudio
{
    uint8_t flags = 0;
    uint16_t channel = 0;
    uint32_t turn = 0;
    uint32_t seq = 0;      // within (turn, audio), from 1
    uint32_t segment = 0;  // reply segment, from 0
    uint32_t sample_rate = 0;
    uint64_t sample = 0;  // position of the first sample on the turn's reply-audio timeline
    const uint8_t* pcm = nullptr;
    size_t pcm_size = 0;  // bytes, always even

    bool LastInSegment() const { return (flags & kFlagLastInSegment) != 0; }
    size_t SampleCount() const { return pcm_size / 2; }
    int16_t PcmSample(size_t i) const
    {
        return static_cast<int16_t>(detail::ReadU16(pcm + 2 * i));
    }
};

// One face record: the reply-audio sample it belongs to and 61 values.
struct FaceRecord
{
    uint64_t sample = 0;
    float values[kFaceValueCount] = {};
};

// Kind 3, server -> client: face records of one segment, sent after its `ready`.
struct FaceFrames
{
    uint8_t flags = 0;
    uint16_t channel = 0;
    uint32_t turn = 0;
    uint32_t seq = 0;  // within (turn, face), from 1
    uint32_t segment = 0;
    uint16_t frame_count = 0;
    uint16_t value_count = kFaceValueCount;
    const uint8_t* records = nullptr;  // frame_count * kFaceRecordSize bytes, unaligned

    FaceRecord Record(size_t i) const
    {
        FaceRecord r;
        const uint8_t* p = records + i * kFaceRecordSize;
        r.sample = detail::ReadU64(p);
        for (size_t k = 0; k < kFaceValueCount; ++k) r.values[k] = detail::ReadF32(p + 8 + 4 * k);
        return r;
    }
};

// One decoded binary message; `kind` says which member is filled.
struct Frame
{
    FrameKind kind = FrameKind::MicAudio;
    MicAudio mic;
    ReplyAudio reply;
    FaceFrames face;
};

namespace detail {
inline DecodeError DecodeReply(const uint8_t* d, size_t size, ReplyAudio& r)
{
    if (size < kReplyAudioHeaderSize || (size - kReplyAudioHeaderSize) % 2 != 0)
        return DecodeError::BadMessage;
    r.flags = d[1];
    r.channel = ReadU16(d + 2);
    r.turn = ReadU32(d + 4);
    r.seq = ReadU32(d + 8);
    r.segment = ReadU32(d + 12);
    r.sample_rate = ReadU32(d + 16);
    r.sample = ReadU64(d + 20);
    r.pcm = d + kReplyAudioHeaderSize;
    r.pcm_size = size - kReplyAudioHeaderSize;
    return DecodeError::None;
}

inline DecodeError DecodeFace(const uint8_t* d, size_t size, FaceFrames& f)
{
    if (size < kFaceHeaderSize) return DecodeError::BadMessage;
    f.flags = d[1];
    f.channel = ReadU16(d + 2);
    f.turn = ReadU32(d + 4);
    f.seq = ReadU32(d + 8);
    f.segment = ReadU32(d + 12);
    f.frame_count = ReadU16(d + 16);
    f.value_count = ReadU16(d + 18);
    f.records = d + kFaceHeaderSize;
    // the size is exactly header + records: anything else is a broken frame
    if (f.value_count != kFaceValueCount ||
        size != kFaceHeaderSize + static_cast<size_t>(f.frame_count) * kFaceRecordSize)
        return DecodeError::BadMessage;
    return DecodeError::None;
}
}  // namespace detail

// Decodes one complete binary WebSocket message (reassemble fragments first).
inline DecodeError Decode(const uint8_t* data, size_t size, Frame& out)
{
    if (size < kCommonHeaderSize) return DecodeError::BadAudio;
    switch (data[0])
    {
    case static_cast<uint8_t>(FrameKind::MicAudio):
        if (size < kMicHeaderSize) return DecodeError::BadAudio;
        out.kind = FrameKind::MicAudio;
        out.mic.flags = data[1];
        out.mic.channel = detail::ReadU16(data + 2);
        out.mic.seq = detail::ReadU32(data + 4);
        out.mic.pcm = data + kMicHeaderSize;
        out.mic.pcm_size = size - kMicHeaderSize;
        return DecodeError::None;
    case static_cast<uint8_t>(FrameKind::ReplyAudio):
        out.kind = FrameKind::ReplyAudio;
        return detail::DecodeReply(data, size, out.reply);
    case static_cast<uint8_t>(FrameKind::FaceFrames):
        out.kind = FrameKind::FaceFrames;
        return detail::DecodeFace(data, size, out.face);
    default:
        return DecodeError::BadMessage;
    }
}

// Writes the 8-byte mic header into `out` (e.g. the front of a TArray<uint8>); the PCM
// follows it in the same binary message.
inline void WriteMicAudioHeader(uint8_t* out, uint16_t channel, uint32_t seq, uint8_t flags = 0)
{
    out[0] = static_cast<uint8_t>(FrameKind::MicAudio);
    out[1] = flags;
    detail::WriteU16(out + 2, channel);
    detail::WriteU32(out + 4, seq);
}

inline std::vector<uint8_t> EncodeMicAudio(uint16_t channel, uint32_t seq, const void* pcm,
                                           size_t pcm_bytes, uint8_t flags = 0)
{
    std::vector<uint8_t> out(kMicHeaderSize + pcm_bytes);
    WriteMicAudioHeader(out.data(), channel, seq, flags);
    if (pcm_bytes) std::memcpy(out.data() + kMicHeaderSize, pcm, pcm_bytes);
    return out;
}

inline std::vector<uint8_t> EncodeReplyAudio(const ReplyAudio& r)
{
    std::vector<uint8_t> out(kReplyAudioHeaderSize + r.pcm_size);
    uint8_t* p = out.data();
    p[0] = static_cast<uint8_t>(FrameKind::ReplyAudio);
    p[1] = r.flags;
    detail::WriteU16(p + 2, r.channel);
    detail::WriteU32(p + 4, r.turn);
    detail::WriteU32(p + 8, r.seq);
    detail::WriteU32(p + 12, r.segment);
    detail::WriteU32(p + 16, r.sample_rate);
    detail::WriteU64(p + 20, r.sample);
    if (r.pcm_size) std::memcpy(p + kReplyAudioHeaderSize, r.pcm, r.pcm_size);
    return out;
}

// `header.frame_count`/`records` are ignored: the records come from `records`, `count` of them.
inline std::vector<uint8_t> EncodeFaceFrames(const FaceFrames& header, const FaceRecord* records,
                                             uint16_t count)
{
    std::vector<uint8_t> out(kFaceHeaderSize + count * kFaceRecordSize);
    uint8_t* p = out.data();
    p[0] = static_cast<uint8_t>(FrameKind::FaceFrames);
    p[1] = header.flags;
    detail::WriteU16(p + 2, header.channel);
    detail::WriteU32(p + 4, header.turn);
    detail::WriteU32(p + 8, header.seq);
    detail::WriteU32(p + 12, header.segment);
    detail::WriteU16(p + 16, count);
    detail::WriteU16(p + 18, static_cast<uint16_t>(kFaceValueCount));
    for (uint16_t i = 0; i < count; ++i)
    {
        uint8_t* rec = p + kFaceHeaderSize + i * kFaceRecordSize;
        detail::WriteU64(rec, records[i].sample);
        for (size_t k = 0; k < kFaceValueCount; ++k)
            detail::WriteF32(rec + 8 + 4 * k, records[i].values[k]);
    }
    return out;
}

}  // namespace parley
