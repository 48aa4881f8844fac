// SPDX-License-Identifier: Apache-2.0
//
// dms_demo: the library's main job on a real model. A tiny Llama-style model, trained here on
// multi-query associative recall (MQAR), answers queries about key-value pairs scattered through
// a 513-token context; how well it answers depends on which tokens its KV cache kept. Every
// policy runs the same evaluation sequences at one target compression ratio, and the program
// prints one table: policy, accuracy, memory compression, KV reads, tokens/s.
//
//   dms_demo [--ratio R] [--sequences N] [--first N] [--storage f32|bf16|f16] [--batch N]
//            [--threads N] [--reference]
//
// Attention runs on the library's fast CPU path (dms::cpu); --reference runs the same on the
// dms::reference oracle instead (same answers, slower).
//
// Everything it needs is compiled in (examples/mqar/model/, embedded by examples/mqar/
// CMakeLists.txt): no download, no path, no flag. DMS runs the DMS-retrofitted checkpoint when
// one is embedded for the target (dms_cr2, dms_cr4, dms_cr8; its compression is its own,
// learned); the training-free policies run the dense model with the per-row budget that reaches
// the compression DMS measured (without a checkpoint: the target; Quest: reads that many tokens
// per step and keeps everything). See README.md, "The tiny model", for what the table
// shows and does not show.

#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "dms/version.hpp"

int main(int argc, char** argv) {
  try {
    mqar::flags f(argc, argv);
    const double ratio = f.number("--ratio", 8.0);
    mqar::run_options o;
    o.count = f.integer("--sequences", 64, 1, 1 << 20);
    o.first = f.integer("--first", 0, 0, 1 << 20);
    o.storage = mqar::parse_storage(f.text("--storage", "bf16"));
    o.batch = f.integer("--batch", 16, 1, 1 << 16);
    o.threads = f.integer("--threads", 0, 0, 1024);
    if (f.has("--reference")) o.backend = mqar::attention_backend::reference;
    f.done();
    if (!(ratio >= 1.0)) dms::detail::fail("--ratio = ", ratio, " is below 1");

    const mqar::model_weights dense = mqar::load_model(mqar::open_file("dense.safetensors"));
    const std::string dms_name = "dms_cr" + std::to_string(int(ratio + 0.5)) + ".safetensors";
    const bool retrofitted = !mqar::embedded_file(dms_name).empty();
    const mqar::model_weights dms_model =
        retrofitted ? mqar::load_model(mqar::open_file(dms_name)) : dense;
    const mqar::eval_set e =
        mqar::load_eval_set(mqar::open_file("eval.safetensors"), dense.cfg.vocab);
    o.count = std::min(o.count, e.sequences - o.first);

    const int fed = e.length - 1, decoded = fed - e.prompt_length();
    std::printf(
        "dms %d.%d.%d demo: a tiny Llama-style model (%d layers, %d query / %d KV heads, "
        "head_dim %d) on multi-query associative recall\n",
        DMS_VERSION_MAJOR, DMS_VERSION_MINOR, DMS_VERSION_PATCH, dense.cfg.n_layers,
        dense.cfg.n_heads, dense.cfg.n_kv_heads, dense.cfg.head_dim);
    std::printf(
        "%d sequences x %d answers (prompt %d tokens, then %d decode steps), K/V %s, "
        "target memory compression %.0fx\n",
        o.count, e.queries(), e.prompt_length(), decoded, mqar::storage_label(o.storage), ratio);
    if (!retrofitted)
      std::printf(
          "DMS: no %s embedded, so DMS reads its decisions from the dense model's query "
          "channel (untrained: plumbing only)\n",
          dms_name.c_str());

    // Dense, then DMS; the training-free policies then get the budget that reaches the memory
    // compression DMS measured (its checkpoint's learned rate, not the target), so that every
    // row of the table compares at the same compression.
    std::vector<std::pair<mqar::policy_kind, mqar::run_result>> rows;
    auto run = [&](mqar::policy_kind k, double r) {
      mqar::policy_options p;
      p.kind = k;
      p.budget = mqar::budget_for_ratio(k, r, fed, decoded);
      rows.emplace_back(k,
                        mqar::evaluate(k == mqar::policy_kind::dms ? dms_model : dense, e, p, o));
      return rows.back().second;
    };
    run(mqar::policy_kind::dense, 1.0);
    const double matched = retrofitted ? run(mqar::policy_kind::dms, ratio).memory_cr : ratio;
    if (retrofitted)
      std::printf(
          "DMS: %s (retrofitted, window %d) measured %.2fx; the training-free policies run the "
          "dense model at that compression (budget %d tokens per row)\n",
          dms_name.c_str(), dms_model.dms.window, matched,
          mqar::budget_for_ratio(mqar::policy_kind::tova, matched, fed, decoded));
    else
      run(mqar::policy_kind::dms, ratio);
    for (const mqar::policy_kind k : mqar::all_policies)
      if (k != mqar::policy_kind::dense && k != mqar::policy_kind::dms) run(k, matched);

    std::printf("\n");
    mqar::print_table_header();
    for (const auto& [k, r] : rows) mqar::print_table_row(r, rows.front().second.kv_reads);
    std::printf(
        "\naccuracy: exact match of the greedy answer (+- its binomial standard error); "
        "memory CR: tokens seen / live slots per (layer, KV head) row at the end of each "
        "sequence; peak slots: per row; KV reads: slots read by decode attention, all "
        "layers; read CR: dense reads / reads.\n");
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "dms_demo: %s\n", ex.what());
    return 1;
  }
}
