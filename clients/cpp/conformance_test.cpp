// Runs parley_protocol.hpp against the binary vectors of clients/vectors/protocol-vectors.json,
// and checks that parley_messages.hpp has a struct for every JSON message the vectors name, with
// exactly the fields the vectors have.
//
//   c++ -std=c++17 -Wall -Wextra -Werror conformance_test.cpp -o conformance
//   ./conformance ../vectors/protocol-vectors.json
//
// Prints "N of M binary vectors passed; ..." and exits 0 when all pass. The small JSON reader
// below exists only so this test needs nothing but a compiler; it is not part of the codec.
#include "parley_messages.hpp"
#include "parley_protocol.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Json
{
    enum class Type { Null, Bool, Number, String, Array, Object } type = Type::Null;
    bool boolean = false;
    bool integer = false;  // a JSON integer: exact in `u64` (or `i64` when negative)
    uint64_t u64 = 0;
    int64_t i64 = 0;
    double number = 0;
    std::string string;
    std::vector<Json> array;
    std::vector<std::pair<std::string, Json>> object;

    const Json* Get(const std::string& key) const
    {
        for (const auto& kv : object)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
};

class Reader
{
public:
    explicit Reader(const std::string& text) : s_(text) {}

    Json Parse()
    {
        Json v = Value();
        Space();
        if (i_ != s_.size()) Fail("trailing characters");
        return v;
    }

private:
    const std::string& s_;
    size_t i_ = 0;

    [[noreturn]] void Fail(const char* what)
    {
        std::fprintf(stderr, "vectors file: %s at byte %zu\n", what, i_);
        std::exit(2);
    }
    void Space()
    {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t'))
            ++i_;
    }
    bool Eat(char c)
    {
        Space();
        if (i_ < s_.size() && s_[i_] == c)
        {
            ++i_;
            return true;
        }
        return false;
    }
    bool Word(const char* w)
    {
        const size_t n = std::char_traits<char>::length(w);
        if (s_.compare(i_, n, w) != 0) return false;
        i_ += n;
        return true;
    }
    Json Value()
    {
        Space();
        if (i_ >= s_.size()) Fail("unexpected end");
        Json v;
        const char c = s_[i_];
        if (c == '{') return Object();
        if (c == '[') return Array();
        if (c == '"')
        {
            v.type = Json::Type::String;
            v.string = String();
            return v;
        }
        if (Word("true") || Word("false"))
        {
            v.type = Json::Type::Bool;
            v.boolean = s_[i_ - 1] == 'e' && s_[i_ - 2] == 'u';
            return v;
        }
        if (Word("null")) return v;
        return Number();
    }
    Json Object()
    {
        Json v;
        v.type = Json::Type::Object;
        ++i_;
        if (Eat('}')) return v;
        do
        {
            Space();
            std::string key = String();
            if (!Eat(':')) Fail("expected ':'");
            v.object.emplace_back(std::move(key), Value());
        } while (Eat(','));
        if (!Eat('}')) Fail("expected '}'");
        return v;
    }
    Json Array()
    {
        Json v;
        v.type = Json::Type::Array;
        ++i_;
        if (Eat(']')) return v;
        do v.array.push_back(Value());
        while (Eat(','));
        if (!Eat(']')) Fail("expected ']'");
        return v;
    }
    static void Utf8(std::string& out, unsigned cp)
    {
        if (cp < 0x80) out += static_cast<char>(cp);
        else if (cp < 0x800)
        {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else if (cp < 0x10000)
        {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else
        {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }
    unsigned Hex4()
    {
        if (i_ + 4 > s_.size()) Fail("short \\u escape");
        const unsigned cp = static_cast<unsigned>(std::stoul(s_.substr(i_, 4), nullptr, 16));
        i_ += 4;
        return cp;
    }
    std::string String()
    {
        if (s_[i_] != '"') Fail("expected a string");
        ++i_;
        std::string out;
        while (i_ < s_.size() && s_[i_] != '"')
        {
            char c = s_[i_++];
            if (c != '\\')
            {
                out += c;
                continue;
            }
            c = s_[i_++];
            switch (c)
            {
            case 'n': out += '\n'; break;
            case 't': out += '\t'; break;
            case 'r': out += '\r'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'u':
            {
                unsigned cp = Hex4();
                if (cp >= 0xD800 && cp < 0xDC00 && Word("\\u")) cp = 0x10000 + ((cp - 0xD800) << 10) + (Hex4() - 0xDC00);
                Utf8(out, cp);
                break;
            }
            default: out += c;  // \" \\ \/
            }
        }
        if (i_ >= s_.size()) Fail("unterminated string");
        ++i_;
        return out;
    }
    Json Number()
    {
        const size_t start = i_;
        while (i_ < s_.size() && std::string("+-0123456789.eE").find(s_[i_]) != std::string::npos) ++i_;
        if (start == i_) Fail("unexpected character");
        const std::string text = s_.substr(start, i_ - start);
        Json v;
        v.type = Json::Type::Number;
        v.number = std::strtod(text.c_str(), nullptr);
        v.integer = text.find_first_of(".eE") == std::string::npos;
        if (v.integer && text[0] == '-') v.i64 = std::stoll(text);
        else if (v.integer) v.u64 = std::stoull(text);
        return v;
    }
};

std::vector<uint8_t> FromHex(const std::string& hex)
{
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<uint8_t>(std::stoul(hex.substr(i, 2), nullptr, 16)));
    return out;
}

std::string ToHex(const uint8_t* p, size_t n)
{
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (size_t i = 0; i < n; ++i)
    {
        out += digits[p[i] >> 4];
        out += digits[p[i] & 15];
    }
    return out;
}

// Compares one decoded field with the vector; collects what differs.
struct Check
{
    const Json& expect;
    std::string problems;

    void U(const char* name, uint64_t got)
    {
        const Json* want = expect.Get(name);
        if (!want || !want->integer || want->u64 != got)
            problems += std::string(" ") + name + "=" + std::to_string(got);
    }
    void Hex(const char* name, const uint8_t* p, size_t n)
    {
        const Json* want = expect.Get(name);
        if (!want || want->string != ToHex(p, n)) problems += std::string(" ") + name;
    }
};

std::string CheckFace(const parley::FaceFrames& f, const Json& expect, Check& check)
{
    check.U("turn", f.turn);
    check.U("seq", f.seq);
    check.U("segment", f.segment);
    check.U("frame_count", f.frame_count);
    check.U("value_count", f.value_count);
    const Json* records = expect.Get("records");
    if (!records || records->array.size() != f.frame_count) return " records";
    std::vector<parley::FaceRecord> decoded;
    for (size_t i = 0; i < f.frame_count; ++i)
    {
        decoded.push_back(f.Record(i));
        const Json& want = records->array[i];
        if (want.Get("sample")->u64 != decoded.back().sample) return " record sample";
        const Json* values = want.Get("values");
        if (!values || values->array.size() != parley::kFaceValueCount) return " record values";
        for (size_t k = 0; k < parley::kFaceValueCount; ++k)  // exact: the values are dyadic
            if (static_cast<float>(values->array[k].number) != decoded.back().values[k])
                return " value " + std::to_string(k) + " of record " + std::to_string(i);
    }
    const auto again = parley::EncodeFaceFrames(f, decoded.data(), f.frame_count);
    return again == std::vector<uint8_t>(f.records - parley::kFaceHeaderSize,
                                         f.records + f.frame_count * parley::kFaceRecordSize)
               ? ""
               : " re-encoding differs";
}

std::string CheckFrame(const std::vector<uint8_t>& bytes, const parley::Frame& frame,
                       const Json& expect)
{
    Check check{expect, ""};
    check.U("kind", static_cast<uint8_t>(frame.kind));
    std::vector<uint8_t> again;
    switch (frame.kind)
    {
    case parley::FrameKind::MicAudio:
        check.U("flags", frame.mic.flags);
        check.U("channel", frame.mic.channel);
        check.U("seq", frame.mic.seq);
        check.Hex("pcm", frame.mic.pcm, frame.mic.pcm_size);
        again = parley::EncodeMicAudio(frame.mic.channel, frame.mic.seq, frame.mic.pcm,
                                       frame.mic.pcm_size, frame.mic.flags);
        break;
    case parley::FrameKind::ReplyAudio:
        check.U("flags", frame.reply.flags);
        check.U("channel", frame.reply.channel);
        check.U("turn", frame.reply.turn);
        check.U("seq", frame.reply.seq);
        check.U("segment", frame.reply.segment);
        check.U("sample_rate", frame.reply.sample_rate);
        check.U("sample", frame.reply.sample);
        check.Hex("pcm", frame.reply.pcm, frame.reply.pcm_size);
        again = parley::EncodeReplyAudio(frame.reply);
        break;
    case parley::FrameKind::FaceFrames:
        check.U("flags", frame.face.flags);
        check.U("channel", frame.face.channel);
        return check.problems + CheckFace(frame.face, expect, check);
    }
    if (again != bytes) check.problems += " re-encoding differs";
    return check.problems;
}

// When `expect` is a message of type M: clears `problem`, then notes every key of `expect` M
// has no field for and, for an all-fields vector, every field of M that `expect` lacks.
template <typename M>
bool Match(const Json& expect, bool all_fields, std::string& problem)
{
    if (expect.Get("type")->string != M::kType) return false;
    problem.clear();
    for (const auto& kv : expect.object)
    {
        bool found = kv.first == "type";
        for (const char* f : M::kFields) found = found || kv.first == f;
        if (!found) problem += " '" + kv.first + "' is not a field of the struct;";
    }
    for (const char* f : M::kFields)
        if (all_fields && !expect.Get(f)) problem += std::string(" no '") + f + "' in the vector;";
    return true;
}

template <typename... M>
std::string StructProblem(parley::MessageList<M...>, const Json& expect, bool all_fields)
{
    std::string problem = " no struct in parley_messages.hpp";
    (void)(Match<M>(expect, all_fields, problem) || ...);
    return problem;
}

bool EndsWith(const std::string& s, const std::string& tail)
{
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s protocol-vectors.json\n", argv[0]);
        return 2;
    }
    std::ifstream file(argv[1], std::ios::binary);
    if (!file)
    {
        std::fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    std::stringstream text;
    text << file.rdbuf();
    const std::string content = text.str();
    const Json vectors = Reader(content).Parse();
    if (vectors.Get("protocol")->u64 != static_cast<uint64_t>(parley::kProtocolVersion))
        std::printf("note: vectors are for protocol %llu, the structs for %lld\n",
                    static_cast<unsigned long long>(vectors.Get("protocol")->u64),
                    static_cast<long long>(parley::kProtocolVersion));
    size_t passed = 0, total = 0;
    for (const Json& v : vectors.Get("binary")->array)
    {
        ++total;
        const std::string& name = v.Get("name")->string;
        const std::vector<uint8_t> bytes = FromHex(v.Get("hex")->string);
        parley::Frame frame;
        const parley::DecodeError error = parley::Decode(bytes.data(), bytes.size(), frame);
        std::string problem;
        if (const Json* want = v.Get("error"))
        {
            if (want->string != parley::ErrorCode(error))
                problem = std::string(" expected error ") + want->string + ", got '" +
                          parley::ErrorCode(error) + "'";
        }
        else if (error != parley::DecodeError::None)
            problem = std::string(" refused with ") + parley::ErrorCode(error);
        else
            problem = CheckFrame(bytes, frame, *v.Get("expect"));
        if (problem.empty()) ++passed;
        else std::printf("FAIL %s:%s\n", name.c_str(), problem.c_str());
    }
    size_t matched = 0, valid = 0;
    for (const Json& v : vectors.Get("json")->array)
    {
        const Json* expect = v.Get("expect");
        if (!expect) continue;
        ++valid;
        const std::string& name = v.Get("name")->string;
        const bool all_fields = EndsWith(name, ".all_fields");
        const std::string problem =
            v.Get("direction")->string == "client->server"
                ? StructProblem(parley::ClientMessages{}, *expect, all_fields)
                : StructProblem(parley::ServerMessages{}, *expect, all_fields);
        if (problem.empty()) ++matched;
        else std::printf("FAIL %s:%s\n", name.c_str(), problem.c_str());
    }
    std::printf("%zu of %zu binary vectors passed; %zu of %zu valid JSON vectors match the "
                "structs of parley_messages.hpp\n", passed, total, matched, valid);
    return passed == total && matched == valid ? 0 : 1;
}
