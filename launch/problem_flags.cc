#include "launch/problem_flags.h"

#include "launch/common.h"
#include "runtime/src/sharding.h"

namespace po = boost::program_options;

namespace ringattn::launch {

bool parse_options(int argc, char** argv, const po::options_description& desc,
                   po::variables_map& vm) {
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    RINGATTN_THROW(ErrorCode::kInvalidArgument, e.what());
  }
  return vm.count("help") > 0;
}

void ProblemFlags::add_to(po::options_description& desc) {
  desc.add_options()("seq-len", po::value(&seq_len)->default_value(seq_len),
                     "global sequence length N (suffixes k, M: 1M = 1048576)")(
      "batch", po::value(&batch)->default_value(batch), "batch size B")(
      "heads", po::value(&heads)->default_value(heads), "query heads H")(
      "kv-heads", po::value(&kv_heads)->default_value(kv_heads),
      "key/value heads H_kv (H % H_kv == 0)")(
      "head-dim", po::value(&head_dim)->default_value(head_dim), "head dimension D")(
      "causal", po::value(&causal)->default_value(causal), "causal mask (true|false)")(
      "window", po::value(&window)->default_value(window), "sliding window W (0 = unlimited)")(
      "sinks", po::value(&sinks)->default_value(sinks), "global sink tokens S")(
      "dtype", po::value(&dtype)->default_value(dtype), "f32 | bf16 | f16")(
      "layout", po::value(&layout)->default_value(layout), "auto | contiguous | zigzag");
}

ProblemFlags::Resolved ProblemFlags::resolve() const {
  Resolved r;
  r.seq_len = parse_count(seq_len, "--seq-len");
  RINGATTN_CHECK(batch > 0 && heads > 0 && kv_heads > 0 && head_dim > 0,
                 "--batch, --heads, --kv-heads and --head-dim must be > 0");
  RINGATTN_CHECK(heads % kv_heads == 0,
                 "heads must be a multiple of kv_heads (H % H_kv == 0), got H=", heads,
                 " H_kv=", kv_heads);
  r.dtype = parse_dtype(dtype);
  r.spec.causal = causal;
  r.spec.window = window;
  r.spec.sinks = sinks;
  r.spec.layout = parse_layout(layout);
  validate_spec(r.spec);
  r.layout = resolve_layout(r.spec.layout, r.spec.causal, r.spec.window);
  return r;
}

std::string ProblemFlags::describe(const Resolved& r) const {
  return detail::str_cat("N=", r.seq_len, " B=", batch, " H=", heads, " H_kv=", kv_heads,
                         " D=", head_dim, r.spec.causal ? " causal" : " bidirectional",
                         " window=", r.spec.window, " sinks=", r.spec.sinks,
                         " layout=", layout_name(r.layout), " dtype=", dtype_name(r.dtype));
}

Json& ProblemFlags::add_to(Json& json, const Resolved& r) const {
  return json.add("batch", batch)
      .add("heads", heads)
      .add("kv_heads", kv_heads)
      .add("head_dim", head_dim)
      .add("causal", r.spec.causal)
      .add("window", r.spec.window)
      .add("sinks", r.spec.sinks)
      .add("layout", layout_name(r.layout))
      .add("dtype", dtype_name(r.dtype));
}

}  // namespace ringattn::launch
