// SPDX-License-Identifier: Apache-2.0
//
// dms_mqar: the MQAR evaluation of a tiny Llama-style model through the library, under any
// policy chosen at run time. Prints accuracy, memory compression, KV reads and tokens/s.
//
//   dms_mqar [--model FILE] [--eval FILE] [--policy NAME|all] [--ratio R | --budget N]
//            [--window N] [--tova-ranking per_kv_head|layer_average] [--h2o-recent N]
//            [--quest-dense-layers N] [--sinks N] [--snapkv-window N] [--snapkv-kernel N]
//            [--snapkv-pooling max|avg] [--storage f32|bf16|f16] [--first N] [--count N]
//            [--batch N] [--chunk N] [--page-size N] [--max-pages N] [--threads N]
//            [--reference] [--json FILE]
//
// --model and --eval take a file, or the name of an embedded one (the default:
// dense.safetensors and eval.safetensors, see examples/mqar/model/). --ratio R gives the
// training-free policies the per-row budget that reaches memory compression R (Quest: the
// tokens it reads); DMS's compression is the checkpoint's own. Attention runs on dms::cpu (the
// fast path; --threads sizes its pool) unless --reference picks the dms::reference oracle.

#include <cstdio>
#include <exception>
#include <string>

#include "cli.hpp"

int main(int argc, char** argv) {
  try {
    mqar::flags f(argc, argv);
    if (f.has("--help") || f.has("-h")) {
      std::puts("usage: see the comment at the top of examples/mqar/mqar.cpp");
      return 0;
    }
    const std::string model_spec = f.text("--model", "dense.safetensors");
    const std::string eval_spec = f.text("--eval", "eval.safetensors");
    const std::string policy = f.text("--policy", "dense");
    const double ratio = f.number("--ratio", 0.0);
    mqar::policy_options p;
    p.budget = f.integer("--budget", p.budget, 1, 1 << 30);
    mqar::read_policy_flags(f, p);
    mqar::run_options o;
    mqar::read_run_flags(f, o);
    const std::string json_path = f.text("--json", "");
    f.done();

    const mqar::model_weights m = mqar::load_model(mqar::open_file(model_spec));
    const mqar::eval_set e = mqar::load_eval_set(mqar::open_file(eval_spec), m.cfg.vocab);
    std::FILE* json = json_path.empty() ? nullptr : std::fopen(json_path.c_str(), "a");
    if (!json_path.empty() && !json) dms::detail::fail("cannot open ", json_path);

    std::printf(
        "model %s (%s), %d layers, %d query / %d KV heads, head_dim %d; %d of %d "
        "sequences of %d tokens, %d answers each; K/V %s\n",
        m.name.c_str(), m.dms.present ? "DMS-retrofitted" : "dense", m.cfg.n_layers, m.cfg.n_heads,
        m.cfg.n_kv_heads, m.cfg.head_dim, o.count < 0 ? e.sequences - o.first : o.count,
        e.sequences, e.length, e.queries(), mqar::storage_label(o.storage));
    mqar::print_table_header();
    std::int64_t dense_reads = 0;
    const int fed = e.length - 1, decoded = fed - e.prompt_length();
    for (const mqar::policy_kind k : mqar::all_policies) {
      if (policy != "all" && mqar::parse_policy(policy) != k) continue;
      p.kind = k;
      if (ratio > 0) p.budget = mqar::budget_for_ratio(k, ratio, fed, decoded);
      const mqar::run_result r = mqar::evaluate(m, e, p, o);
      if (k == mqar::policy_kind::dense) dense_reads = r.kv_reads;
      mqar::print_table_row(r, dense_reads);
      if (json) mqar::write_json_line(json, r, p, o, model_spec);
    }
    if (json) std::fclose(json);
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "dms_mqar: %s\n", ex.what());
    return 1;
  }
}
