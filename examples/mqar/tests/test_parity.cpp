// SPDX-License-Identifier: Apache-2.0
// The C++ runner against the PyTorch model it was trained as: the same logits on shipped
// sequences, and the same accuracy on the CI subset of the evaluation set as the Python
// evaluation recorded (examples/mqar/model/records.json, written by train/train_dense.py).

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

std::string model_file(const std::string& name) {
  return std::string(DMS_MQAR_MODEL_DIR) + "/" + name;
}

mqar::json::value records() {
  std::ifstream in(model_file("records.json"));
  REQUIRE(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return mqar::json::parse(ss.str());
}

const mqar::model_weights& dense() {
  static const mqar::model_weights m = mqar::load_model(mqar::open_file("dense.safetensors"));
  return m;
}
const mqar::eval_set& evaluation() {
  static const mqar::eval_set e =
      mqar::load_eval_set(mqar::open_file("eval.safetensors"), dense().cfg.vocab);
  return e;
}

}  // namespace

TEST_CASE("dense logits equal the PyTorch model's within 1e-4", "[model][parity]") {
  const auto parity = mqar::safetensors_file::read(model_file("parity.safetensors"));
  const auto tokens = parity.load<std::int32_t>("tokens");
  const auto positions = parity.load<std::int32_t>("positions");
  const auto& t = parity.info("tokens");
  const int S = int(t.shape[0]), T = int(t.shape[1]), V = dense().cfg.vocab;
  const auto logits = parity.load<float>(
      "logits", {std::int64_t(S), std::int64_t(positions.size()), std::int64_t(V)});
  const int prompt = evaluation().prompt_length();

  // Chunks of 100 cross page (16) and chunk boundaries at odd places; then 32 decode steps.
  const int chunk = GENERATE(100, 513);
  const auto backend = GENERATE(mqar::attention_backend::fast, mqar::attention_backend::reference);
  mqar::policy_options p;  // dense
  mqar::run_options o;
  o.chunk = chunk;
  o.backend = backend;
  float worst = 0;
  for (int s = 0; s < S; ++s) {
    const std::vector<int> seq(tokens.begin() + std::ptrdiff_t(s) * T,
                               tokens.begin() + std::ptrdiff_t(s + 1) * T);
    const auto ours = mqar::sequence_logits(dense(), seq, prompt, p, o);
    for (std::size_t i = 0; i < positions.size(); ++i)
      for (int v = 0; v < V; ++v) {
        const float a = ours[std::size_t(positions[i]) * V + v];
        const float b = logits[(std::size_t(s) * positions.size() + i) * V + v];
        worst = std::max(worst, std::abs(a - b));
      }
  }
  INFO("chunk " << chunk << ", "
                << (backend == mqar::attention_backend::fast ? "fast" : "reference")
                << " attention: largest |C++ - torch| logit difference " << worst);
  CHECK(worst <= 1e-4f);
}

TEST_CASE("dense accuracy on the CI subset equals the Python evaluation's", "[model][parity]") {
  const auto rec = records().at("dense", "records.json");
  const int n =
      int(rec.at("ci_subset_sequences", "dense").as_int("ci_subset_sequences", 1, 1 << 20));
  const int expected =
      int(rec.at("ci_subset_correct", "dense").as_int("ci_subset_correct", 0, 1 << 30));
  mqar::policy_options p;
  mqar::run_options o;
  o.count = n;
  o.backend = GENERATE(mqar::attention_backend::fast, mqar::attention_backend::reference);
  const mqar::run_result r = mqar::evaluate(dense(), evaluation(), p, o);
  CHECK(r.answers == n * evaluation().queries());
  CHECK(r.correct == expected);
  CHECK(r.memory_cr == 1.0);
  // Dense reads every slot: per decode step, each of the layers x KV heads rows reads all it holds.
  std::int64_t reads = 0;
  for (int t = evaluation().prompt_length() + 1; t < evaluation().length; ++t) reads += t;
  CHECK(r.kv_reads == reads * n * dense().cfg.n_layers * dense().cfg.n_kv_heads);
}
