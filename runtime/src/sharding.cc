#include "runtime/src/sharding.h"

#include <algorithm>

#include "ringattn/error.h"

namespace ringattn {
namespace {

// Piece c of `pieces` near-equal pieces of [0, n): the first n % pieces are one token longer,
// so piece c starts at c * base + min(c, rem).
PosRange even_piece(int64_t n, int64_t pieces, int64_t c) {
  const int64_t base = n / pieces, rem = n % pieces;
  const int64_t begin = c * base + std::min(c, rem);
  return {begin, begin + base + (c < rem ? 1 : 0)};
}

bool is_resolved(Layout layout) {
  return layout == Layout::kContiguous || layout == Layout::kZigzag;
}

}  // namespace

int64_t Shard::size() const {
  int64_t n = 0;
  for (const PosRange& run : runs) n += run.size();
  return n;
}

int64_t Shard::position(int64_t local) const {
  RINGATTN_CHECK(local >= 0, "local index must be >= 0, got ", local);
  int64_t offset = local;
  for (const PosRange& run : runs) {
    if (offset < run.size()) return run.begin + offset;
    offset -= run.size();
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "local index ", local,
                 " out of range: expected < shard size ", size());
}

void Shard::positions(int64_t lo, int64_t hi, int64_t* out) const {
  RINGATTN_CHECK(lo >= 0 && lo <= hi && hi <= size(), "local range [", lo, ", ", hi,
                 ") out of range: expected 0 <= lo <= hi <= shard size ", size());
  int64_t run_start = 0;  // local index of the current run's first token
  for (const PosRange& run : runs) {
    const int64_t run_end = run_start + run.size();
    // Overlap of [lo, hi) with this run's local indices [run_start, run_end).
    for (int64_t k = std::max(lo, run_start); k < std::min(hi, run_end); ++k) {
      *out++ = run.begin + (k - run_start);
    }
    run_start = run_end;
  }
}

int64_t Shard::local_index(int64_t global) const {
  int64_t run_start = 0;
  for (const PosRange& run : runs) {
    if (global >= run.begin && global < run.end) return run_start + (global - run.begin);
    run_start += run.size();
  }
  return -1;
}

Layout resolve_layout(Layout layout, bool causal, int64_t window) {
  if (layout != Layout::kAuto) return layout;
  // Zigzag balances the triangle of a full causal mask; with a window every rank already does
  // the same O(N_local * W) work, and contiguous keeps the window's neighbours one hop away.
  return causal && window == 0 ? Layout::kZigzag : Layout::kContiguous;
}

void check_sharding(int64_t seq_len, int world, Layout resolved_layout, int64_t sinks) {
  RINGATTN_CHECK(world >= 1, "world size must be >= 1, got ", world);
  RINGATTN_CHECK(is_resolved(resolved_layout), "sharding needs a resolved layout: expected ",
                 "contiguous or zigzag, got ", layout_name(resolved_layout));
  RINGATTN_CHECK(seq_len >= world, "sequence length N = ", seq_len,
                 " is shorter than the world size P = ", world,
                 ": expected N >= P (every rank holds at least one token)");
  RINGATTN_CHECK(sinks >= 0, "sinks must be >= 0, got ", sinks);
  const int64_t first = make_shard(seq_len, world, 0, resolved_layout).runs.front().size();
  RINGATTN_CHECK(sinks <= first, "sinks ", sinks, " exceed the first chunk of rank 0 (", first,
                 " tokens) for N = ", seq_len, ", P = ", world, ", layout ",
                 layout_name(resolved_layout), ": expected sinks <= ", first,
                 " (the sink owner broadcasts them as one block)");
}

Shard make_shard(int64_t seq_len, int world, int rank, Layout resolved_layout) {
  RINGATTN_CHECK(world >= 1, "world size must be >= 1, got ", world);
  RINGATTN_CHECK(rank >= 0 && rank < world, "rank ", rank, " out of range: expected 0 <= rank < ",
                 world);
  RINGATTN_CHECK(seq_len >= world, "sequence length N = ", seq_len,
                 " is shorter than the world size P = ", world, ": expected N >= P");
  RINGATTN_CHECK(is_resolved(resolved_layout), "sharding needs a resolved layout: expected ",
                 "contiguous or zigzag, got ", layout_name(resolved_layout));
  Shard shard;
  if (resolved_layout == Layout::kContiguous) {
    shard.runs.push_back(even_piece(seq_len, world, rank));
    return shard;
  }
  // Zigzag: 2P chunks; rank r takes chunk r then its mirror 2P-1-r. With N < 2P the last
  // 2P - N chunks are empty, but chunk r (r < P <= N) never is, so every rank holds a token.
  const int64_t chunks = 2 * static_cast<int64_t>(world);
  for (int64_t c : {static_cast<int64_t>(rank), chunks - 1 - rank}) {
    const PosRange run = even_piece(seq_len, chunks, c);
    if (run.size() > 0) shard.runs.push_back(run);
  }
  return shard;
}

}  // namespace ringattn
