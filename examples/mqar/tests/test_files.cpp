// SPDX-License-Identifier: Apache-2.0
// Truncated and corrupt model files give a dms::error that says what is wrong, never a crash.

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

std::vector<unsigned char> shipped_dense() {
  const auto bytes = mqar::embedded_file("dense.safetensors");
  return {bytes.begin(), bytes.end()};
}

std::uint64_t header_length(const std::vector<unsigned char>& f) {
  std::uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | f[std::size_t(b)];
  return n;
}

// Replaces the JSON header by `json` (padded to the old length with spaces when it fits, so the
// data section stays where it was).
std::vector<unsigned char> with_header(const std::vector<unsigned char>& f, std::string json) {
  const std::uint64_t n = header_length(f);
  if (json.size() < n) json.append(n - json.size(), ' ');
  const std::size_t data = f.size() - 8 - n;
  std::vector<unsigned char> out(8 + json.size() + data);
  for (int b = 0; b < 8; ++b) out[std::size_t(b)] = (json.size() >> (8 * b)) & 0xff;
  std::memcpy(out.data() + 8, json.data(), json.size());
  std::memcpy(out.data() + 8 + json.size(), f.data() + 8 + n, data);
  return out;
}

std::string header_text(const std::vector<unsigned char>& f) {
  return std::string(f.begin() + 8, f.begin() + 8 + std::ptrdiff_t(header_length(f)));
}

void load(const std::vector<unsigned char>& bytes) {
  (void)mqar::load_model(
      mqar::safetensors_file::parse(std::span<const unsigned char>(bytes), "test"));
}

void replace_once(std::string& s, const std::string& from, const std::string& to) {
  const auto at = s.find(from);
  REQUIRE(at != std::string::npos);
  s.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("the shipped model loads", "[model][files]") {
  REQUIRE_NOTHROW(load(shipped_dense()));
}

TEST_CASE("a truncated model file is a dms::error", "[model][files]") {
  const auto f = shipped_dense();
  const std::uint64_t n = header_length(f);
  for (const std::size_t keep :
       {std::size_t(0), std::size_t(7), std::size_t(8), std::size_t(20), std::size_t(8 + n / 2),
        std::size_t(8 + n), std::size_t(8 + n + 1000), f.size() - 1}) {
    INFO("kept " << keep << " of " << f.size() << " bytes");
    const std::vector<unsigned char> cut(f.begin(), f.begin() + std::ptrdiff_t(keep));
    CHECK_THROWS_AS(load(cut), dms::error);
  }
  CHECK_THROWS_WITH(load({f.begin(), f.begin() + 7}), Catch::Contains("too short"));
  CHECK_THROWS_WITH(load({f.begin(), f.begin() + 8 + std::ptrdiff_t(n) / 2}),
                    Catch::Contains("header length"));
  CHECK_THROWS_WITH(load({f.begin(), f.end() - 1}), Catch::Contains("data_offsets"));
}

TEST_CASE("a corrupt model file is a dms::error naming the problem", "[model][files]") {
  const auto f = shipped_dense();
  const std::string h = header_text(f);

  SECTION("header length beyond the file") {
    auto g = f;
    g[6] = 0x7f;
    CHECK_THROWS_WITH(load(g), Catch::Contains("header length"));
  }
  SECTION("not JSON") {
    auto s = h;
    s[s.size() / 2] = '\x01';
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("corrupt header"));
    auto t = h;
    t[0] = '[';
    CHECK_THROWS_WITH(load(with_header(f, t)), Catch::Contains("'{'"));
  }
  SECTION("unknown dtype") {
    auto s = h;
    replace_once(s, "\"F32\"", "\"F64\"");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("dtype \"F64\""));
  }
  SECTION("shape that does not match the byte range") {
    auto s = h;
    replace_once(s, "\"shape\":[256,128]", "\"shape\":[256,129]");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("needs"));
  }
  SECTION("a tensor of the wrong shape for the config") {
    auto s = h;
    replace_once(s, "\"shape\":[256,128]", "\"shape\":[128,256]");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("expected [256, 128]"));
  }
  SECTION("offsets outside the data section") {
    auto s = h;
    replace_once(s, "\"data_offsets\":[0,", "\"data_offsets\":[90000000,");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("data_offsets[0]"));
  }
  SECTION("overlapping tensors") {
    // Point the second tensor at the first one's bytes (sizes agree for the two norms).
    auto s = h;
    const auto a = s.find("\"layers.0.attn_norm.weight\"");
    const auto b = s.find("\"layers.0.mlp_norm.weight\"");
    REQUIRE(a != std::string::npos);
    REQUIRE(b != std::string::npos);
    const auto off_a = s.find("data_offsets", a), off_b = s.find("data_offsets", b);
    const auto end_a = s.find(']', off_a), end_b = s.find(']', off_b);
    s.replace(off_b, end_b - off_b, s.substr(off_a, end_a - off_a));
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("overlap"));
  }
  SECTION("a missing tensor") {
    auto s = h;
    replace_once(s, "\"norm.weight\"", "\"norm.weigh_\"");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("no tensor \"norm.weight\""));
  }
  SECTION("no config") {
    auto s = h;
    replace_once(s, "\"config\"", "\"c0nfig\"");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("no \"config\""));
  }
  SECTION("a config that does not add up") {
    auto s = h;
    replace_once(s, "\\\"n_kv_heads\\\": 2", "\\\"n_kv_heads\\\": 3");
    CHECK_THROWS_WITH(load(with_header(f, s)), Catch::Contains("not a multiple"));
  }
  SECTION("a non-finite weight") {
    auto g = f;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(g.data() + 8 + header_length(f), &nan, sizeof nan);
    CHECK_THROWS_WITH(load(g), Catch::Contains("not finite"));
  }
}

TEST_CASE("random byte damage to the header never crashes the reader", "[model][files]") {
  const auto f = shipped_dense();
  const std::uint64_t n = header_length(f);
  std::uint64_t state = 12345;
  int rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    auto g = f;
    for (int k = 0; k < 3; ++k) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      g[8 + (state >> 33) % n] = static_cast<unsigned char>(state >> 17);
    }
    try {
      load(g);
    } catch (const dms::error&) {
      ++rejected;
    }
  }
  CHECK(rejected > 0);  // most damage is caught; none may crash (ASan/UBSan run this too)
}

TEST_CASE("the JSON reader is strict", "[model][files]") {
  using mqar::json::parse;
  CHECK(parse("{\"a\": [1, 2.5e1, -0.5], \"b\": \"x\\u0041\"}").at("b", "doc").as_string("b") ==
        "xA");
  CHECK(parse("[1, 2]").as_array("doc").size() == 2);
  for (const char* bad : {"", "{", "{\"a\" 1}", "{\"a\": 1,}", "[1 2]", "01", "1.", "\"\\x\"",
                          "{\"a\": 1, \"a\": 2}", "nul", "[1] 2"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse(bad), dms::error);
  }
  std::string deep(100, '[');
  CHECK_THROWS_WITH(parse(deep), Catch::Contains("nesting"));
  CHECK_THROWS_WITH(parse("{\"a\": 1.5}").at("a", "doc").as_int("a", 0, 9),
                    Catch::Contains("integer"));
}
