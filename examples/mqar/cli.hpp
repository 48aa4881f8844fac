// SPDX-License-Identifier: Apache-2.0
#pragma once

// What the MQAR programs (dms_mqar, dms_demo) share: a tiny flag parser, loading a model or an
// evaluation set from an embedded copy or a file, and the results table.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "dms/error.hpp"
#include "embedded.hpp"
#include "eval_set.hpp"
#include "model.hpp"
#include "runner.hpp"
#include "safetensors.hpp"

namespace mqar {

/// `--name value` flags; each flag may be taken once, and leftovers are an error.
class flags {
 public:
  flags(int argc, char** argv) : args_(argv + 1, argv + argc) {}

  bool has(std::string_view name) {
    for (std::size_t i = 0; i < args_.size(); ++i)
      if (args_[i] == name) {
        args_.erase(args_.begin() + std::ptrdiff_t(i));
        return true;
      }
    return false;
  }
  std::string text(std::string_view name, std::string fallback) {
    for (std::size_t i = 0; i < args_.size(); ++i)
      if (args_[i] == name) {
        if (i + 1 >= args_.size()) dms::detail::fail("flag ", name, " needs a value");
        std::string v = args_[i + 1];
        args_.erase(args_.begin() + std::ptrdiff_t(i), args_.begin() + std::ptrdiff_t(i) + 2);
        return v;
      }
    return fallback;
  }
  int integer(std::string_view name, int fallback, int lo, int hi) {
    const std::string v = text(name, "");
    if (v.empty()) return fallback;
    char* end = nullptr;
    const long x = std::strtol(v.c_str(), &end, 10);
    if (*end != '\0') dms::detail::fail("flag ", name, " = \"", v, "\" is not an integer");
    dms::detail::check_range(std::string(name).c_str(), x, long(lo), long(hi));
    return int(x);
  }
  double number(std::string_view name, double fallback) {
    const std::string v = text(name, "");
    if (v.empty()) return fallback;
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (*end != '\0') dms::detail::fail("flag ", name, " = \"", v, "\" is not a number");
    return x;
  }
  /// Throws naming the first flag nobody asked for.
  void done() const {
    if (!args_.empty()) dms::detail::fail("unknown argument \"", args_.front(), "\" (see --help)");
  }

 private:
  std::vector<std::string> args_;
};

/// An embedded file by name ("dense.safetensors"), else a path.
inline safetensors_file open_file(const std::string& spec) {
  const auto bytes = embedded_file(spec);
  if (!bytes.empty()) return safetensors_file::parse(bytes, spec + " (embedded)");
  return safetensors_file::read(spec);
}

/// Reads the policy flags shared by both programs into `p` (budget handled by the caller).
inline void read_policy_flags(flags& f, policy_options& p) {
  p.dms_window = f.integer("--window", p.dms_window, 0, 1 << 20);
  const std::string rank = f.text("--tova-ranking", "per_kv_head");
  if (rank == "per_kv_head")
    p.tova_ranking = dms::tova_ranking::per_kv_head;
  else if (rank == "layer_average")
    p.tova_ranking = dms::tova_ranking::layer_average;
  else
    dms::detail::fail("--tova-ranking \"", rank, "\" is not per_kv_head or layer_average");
  p.h2o_recent = f.integer("--h2o-recent", p.h2o_recent, -1, 1 << 20);
  p.quest_dense_layers = f.integer("--quest-dense-layers", p.quest_dense_layers, 0, 1 << 10);
  p.sinks = f.integer("--sinks", p.sinks, 0, 1 << 20);
  p.snapkv_window = f.integer("--snapkv-window", p.snapkv_window, 1, 1 << 20);
  p.snapkv_kernel = f.integer("--snapkv-kernel", p.snapkv_kernel, 1, 1023);
  const std::string pool = f.text("--snapkv-pooling", "max");
  if (pool == "max")
    p.snapkv_pooling = dms::snapkv_pooling::max;
  else if (pool == "avg")
    p.snapkv_pooling = dms::snapkv_pooling::avg;
  else
    dms::detail::fail("--snapkv-pooling \"", pool, "\" is not max or avg");
}

inline void read_run_flags(flags& f, run_options& o) {
  o.storage = parse_storage(f.text("--storage", storage_label(o.storage)));
  o.first = f.integer("--first", o.first, 0, 1 << 30);
  o.count = f.integer("--count", o.count, -1, 1 << 30);
  o.batch = f.integer("--batch", o.batch, 1, 1 << 16);
  o.chunk = f.integer("--chunk", o.chunk, 1, 1 << 20);
  o.page_size = f.integer("--page-size", o.page_size, 1, 4096);
  o.max_pages = f.integer("--max-pages", o.max_pages, 0, 1 << 30);
  o.threads = f.integer("--threads", o.threads, 0, 1024);
  if (f.has("--reference")) o.backend = attention_backend::reference;
}

// ---- the table ----------------------------------------------------------------------------

inline void print_table_header() {
  std::printf("%-13s %9s %7s %9s %10s %10s %9s %8s %9s\n", "policy", "accuracy", "+-s.e.",
              "memory CR", "peak slots", "KV reads", "read CR", "tok/s", "wall s");
  std::printf("%-13s %9s %7s %9s %10s %10s %9s %8s %9s\n", "-------------", "---------", "-------",
              "---------", "----------", "----------", "---------", "--------", "---------");
}

/// dense_reads: the dense run's KV reads for the read ratio (0 = not known).
inline void print_table_row(const run_result& r, std::int64_t dense_reads,
                            const char* label = nullptr) {
  const double read_cr = dense_reads > 0 && r.kv_reads > 0 ? double(dense_reads) / r.kv_reads : 0;
  std::printf("%-13s %9.4f %7.4f %8.2fx %10.1f %10lld %8.2fx %8.0f %9.2f\n",
              label ? label : r.policy.c_str(), r.accuracy(), r.standard_error(), r.memory_cr,
              r.mean_peak_slots, static_cast<long long>(r.kv_reads), read_cr, r.tokens_per_second(),
              r.seconds);
}

/// One JSON object per line, for scripts (docs/accuracy.md is made from these).
inline void write_json_line(std::FILE* f, const run_result& r, const policy_options& p,
                            const run_options& o, const std::string& model) {
  std::fprintf(
      f,
      "{\"model\": \"%s\", \"policy\": \"%s\", \"budget\": %d, \"window\": %d, "
      "\"storage\": \"%s\", \"first\": %d, \"sequences\": %d, \"answers\": %d, "
      "\"correct\": %d, \"accuracy\": %.6f, \"stderr\": %.6f, \"memory_cr\": %.6f, "
      "\"mean_peak_slots\": %.3f, \"mean_final_slots\": %.3f, \"kv_reads\": %lld, "
      "\"prompt_tokens\": %lld, \"decode_tokens\": %lld, \"seconds\": %.3f, "
      "\"tova_ranking\": \"%s\", \"batch\": %d}\n",
      model.c_str(), r.policy.c_str(), p.budget, p.dms_window, storage_label(o.storage), o.first,
      r.sequences, r.answers, r.correct, r.accuracy(), r.standard_error(), r.memory_cr,
      r.mean_peak_slots, r.mean_final_slots, static_cast<long long>(r.kv_reads),
      static_cast<long long>(r.prompt_tokens), static_cast<long long>(r.decode_tokens), r.seconds,
      p.tova_ranking == dms::tova_ranking::per_kv_head ? "per_kv_head" : "layer_average", o.batch);
  std::fflush(f);
}

}  // namespace mqar
