#pragma once
/// Flags shared by the subcommands that run a synthetic attention problem (infer, bench ring):
/// one definition of each flag, its default and its validation.

#include <boost/program_options.hpp>
#include <cstdint>
#include <string>

#include "launch/common.h"
#include "ringattn/attention.h"

namespace ringattn::launch {

/// Parses argv into vm with desc; Boost's errors become Error(kInvalidArgument). Returns true
/// when --help was given (the caller prints desc).
bool parse_options(int argc, char** argv, const boost::program_options::options_description& desc,
                   boost::program_options::variables_map& vm);

/// Shape and mask of a synthetic problem. Construct with the subcommand's defaults, add_to()
/// its options, then resolve() after parsing.
struct ProblemFlags {
  std::string seq_len = "32k";
  int64_t batch = 1, heads = 8, kv_heads = 2, head_dim = 64;
  bool causal = true;
  int64_t window = 0, sinks = 0;
  std::string dtype = "f32", layout = "auto";

  /// Adds --seq-len --batch --heads --kv-heads --head-dim --causal --window --sinks --dtype
  /// --layout, with the current values as defaults.
  void add_to(boost::program_options::options_description& desc);

  /// The validated problem. Throws Error naming the bad flag.
  struct Resolved {
    int64_t seq_len = 0;
    AttentionSpec spec;
    DType dtype = DType::kF32;
    Layout layout = Layout::kContiguous;  ///< resolved: contiguous or zigzag
  };
  Resolved resolve() const;

  /// Adds batch, heads, kv_heads, head_dim, causal, window, sinks, layout and dtype to a
  /// command's JSON summary (the keys every command writes alike).
  Json& add_to(Json& json, const Resolved& r) const;

  /// "N=262144 B=1 H=8 H_kv=2 D=64 causal window=4096 sinks=4 layout=contiguous dtype=f32".
  std::string describe(const Resolved& r) const;
};

}  // namespace ringattn::launch
