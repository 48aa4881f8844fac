// SPDX-License-Identifier: Apache-2.0
// The retrofitted DMS checkpoints through the library: on the CI subset of the evaluation set,
// every shipped dms_* model answers as many queries, at the same memory compression, as the
// Python evaluation recorded when it was trained (examples/mqar/model/records.json, written by
// train/train_dms.py). This is the guard that the library's DMS is the semantics the model was
// trained under: a shift of the decision by one token, a window off by one, or slots reused too
// early moves both numbers.

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

const mqar::eval_set& evaluation(int vocab) {
  static const mqar::eval_set e = mqar::load_eval_set(mqar::open_file("eval.safetensors"), vocab);
  return e;
}

}  // namespace

TEST_CASE("every DMS checkpoint matches its recorded accuracy and compression", "[model][dms]") {
  const auto all = records();
  int checked = 0;
  for (const auto& [name, rec] : all.as_object("records.json")) {
    if (name.rfind("dms_", 0) != 0) continue;
    ++checked;
    INFO("checkpoint " << name);
    const mqar::model_weights m =
        mqar::load_model(mqar::safetensors_file::read(model_file(name + ".safetensors")));
    const int n =
        int(rec.at("ci_subset_sequences", name).as_int("ci_subset_sequences", 1, 1 << 20));
    const int expected =
        int(rec.at("ci_subset_correct", name).as_int("ci_subset_correct", 0, 1 << 30));
    const double expected_cr = rec.at("ci_subset_memory_cr", name).as_number("ci_subset_memory_cr");
    const auto& e = evaluation(m.cfg.vocab);

    mqar::policy_options p;
    p.kind = mqar::policy_kind::dms;  // the checkpoint's own window
    mqar::run_options o;
    o.count = n;
    o.storage = mqar::kv_storage::f32;
    const mqar::run_result r = mqar::evaluate(m, e, p, o);
    INFO("f32: " << r.correct << "/" << r.answers << " at CR " << r.memory_cr << "; recorded "
                 << expected << " at CR " << expected_cr);
    CHECK(r.answers == n * e.queries());
    // Float32 in both, but torch sums in another order: a decision logit within rounding of 0
    // or an answer logit tie may flip, so one answer and 0.5% of CR of slack, no more.
    CHECK(std::abs(r.correct - expected) <= 1);
    CHECK(std::abs(r.memory_cr - expected_cr) <= 0.005 * expected_cr);

    // bf16 K/V (what the demo stores): rounding the keys may flip a few more decisions.
    o.storage = mqar::kv_storage::bf16;
    const mqar::run_result b = mqar::evaluate(m, e, p, o);
    INFO("bf16: " << b.correct << "/" << b.answers << " at CR " << b.memory_cr);
    CHECK(b.correct >= expected - 4);
    CHECK(std::abs(b.memory_cr - expected_cr) <= 0.02 * expected_cr);
  }
  CHECK(checked > 0);
}
