// SPDX-License-Identifier: Apache-2.0
// The fuzz scenarios without libFuzzer, with any compiler:
//   dms_fuzz_replay <file or directory>...    every input (the committed corpus: ctest fuzz.corpus)
//   dms_fuzz_replay --stress [ops] [seed] [n] deterministic stress run: inputs of random bytes
//                                             from `seed` (default 1) until `ops` operations
//                                             (default 10^6) have run; a failure names the input
//                                             number n; with n, only that input runs and its
//                                             bytes are written to stress-input.bin
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz_scenario.hpp"

namespace {

int replay(int argc, char** argv) {
  std::vector<std::filesystem::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p))
        if (e.is_regular_file()) inputs.push_back(e.path());
    } else {
      inputs.push_back(p);
    }
  }
  std::sort(inputs.begin(), inputs.end());
  if (inputs.empty()) {
    std::fprintf(stderr, "dms_fuzz_replay: no inputs\n");
    return 2;
  }
  long events = 0;
  for (const auto& p : inputs) {
    std::ifstream f(p, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(f)),
                                  std::istreambuf_iterator<char>());
    const auto o =
        dms_fuzz::run_input(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    events += o.events;
    if (!o.error.empty()) {
      std::fprintf(stderr, "dms_fuzz_replay: %s: %s: %s\n", p.string().c_str(), o.what.c_str(),
                   o.error.c_str());
      return 1;
    }
  }
  std::printf("dms_fuzz_replay: %zu inputs, %ld operations passed\n", inputs.size(), events);
  return 0;
}

int stress(long ops, std::uint64_t seed, long only) {
  dms_bf::rng r{seed};
  std::vector<std::uint8_t> bytes(2048);
  long done = 0, inputs = 0;
  while (done < ops) {
    for (auto& b : bytes) b = std::uint8_t(r.next());
    if (only > 0 && inputs + 1 != only) {  // reproducing one input: skip the others
      ++inputs;
      continue;
    }
    const auto o = dms_fuzz::run_input(bytes.data(), bytes.size());
    if (only > 0) {
      std::FILE* f = std::fopen("stress-input.bin", "wb");
      if (f) std::fwrite(bytes.data(), 1, bytes.size(), f), std::fclose(f);
      ops = 0;  // done after this one; its bytes are in stress-input.bin
    }
    done += o.events;
    ++inputs;
    if (!o.error.empty()) {
      std::fprintf(stderr, "dms_fuzz_replay --stress: seed %llu, input %ld: %s: %s\n",
                   static_cast<unsigned long long>(seed), inputs, o.what.c_str(), o.error.c_str());
      return 1;
    }
  }
  std::printf("dms_fuzz_replay --stress: %ld operations in %ld scenarios passed (seed %llu)\n",
              done, inputs, static_cast<unsigned long long>(seed));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--stress") == 0)
    return stress(argc > 2 ? std::atol(argv[2]) : 1000000,
                  argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1,
                  argc > 4 ? std::atol(argv[4]) : 0);
  return replay(argc, argv);
}
