#include "launch/common.h"

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "ringattn/error.h"
#include "ringattn/ring.h"

namespace ringattn::launch {

int run_mpi_command(int argc, char** argv, const char* name,
                    const std::function<int(MpiSession&, int, char**)>& body) {
  MpiSession session(&argc, &argv);
  try {
    return body(session, argc, argv);
  } catch (const AgreedError& e) {
    std::fprintf(stderr, "ringattn %s: %s\n", name, e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn %s: %s (aborting all ranks)\n", name, e.what());
    std::fflush(stderr);
    session.abort(1);
  }
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

void fill_synthetic(const Shard& shard, int64_t batch, int64_t heads, int64_t dim, uint64_t seed,
                    int layer, int tensor, DType dtype, void* out) {
  const int64_t n = shard.size();
  const uint64_t base = splitmix64(
      seed ^ splitmix64((static_cast<uint64_t>(layer) << 8) | static_cast<uint64_t>(tensor)));
  int64_t i = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      const uint64_t row = splitmix64(base ^ splitmix64((static_cast<uint64_t>(b) << 40) ^
                                                        static_cast<uint64_t>(shard.position(t))));
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t c = 0; c < dim; ++c, ++i) {
          const uint64_t r = splitmix64(row + static_cast<uint64_t>(h * dim + c));
          const float u = static_cast<float>(r >> 40) * (2.0f / 16777216.0f) - 1.0f;
          store_from_float(out, dtype, i, u);
        }
      }
    }
  }
}

void sleeping_barrier(MPI_Comm comm) {
  MPI_Request req;
  MPI_Ibarrier(comm, &req);
  int done = 0;
  while (!done) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace {

// Splits "64k" into 64 and "k"; throws on anything that is not digits + letters.
std::pair<double, std::string> split_number(const std::string& text, const char* flag) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.'))
    ++i;
  RINGATTN_CHECK(i > 0, flag, ": expected a number, got '", text, "'");
  double value = 0;
  try {
    value = std::stod(text.substr(0, i));
  } catch (const std::exception&) {
    RINGATTN_THROW(ErrorCode::kInvalidArgument, flag, ": expected a number, got '", text, "'");
  }
  return {value, text.substr(i)};
}
}  // namespace

int64_t parse_count(const std::string& text, const char* flag) {
  auto [value, suffix] = split_number(text, flag);
  double mult = 1;
  if (suffix == "k" || suffix == "K")
    mult = 1024.0;
  else if (suffix == "M" || suffix == "m")
    mult = 1024.0 * 1024.0;
  else if (suffix == "G" || suffix == "g")
    mult = 1024.0 * 1024.0 * 1024.0;
  else
    RINGATTN_CHECK(suffix.empty(), flag, ": unknown suffix '", suffix, "' in '", text,
                   "' (expected k, M or G)");
  const double n = value * mult;
  RINGATTN_CHECK(n == std::floor(n) && n < 9e18, flag, ": '", text, "' is not a whole count");
  return static_cast<int64_t>(n);
}

int64_t parse_bytes(const std::string& text, const char* flag) {
  auto [value, suffix] = split_number(text, flag);
  double mult = 1;
  if (suffix == "KiB")
    mult = 1024.0;
  else if (suffix == "MiB")
    mult = 1024.0 * 1024;
  else if (suffix == "GiB")
    mult = 1024.0 * 1024 * 1024;
  else if (suffix == "TiB")
    mult = 1024.0 * 1024 * 1024 * 1024;
  else if (suffix == "KB" || suffix == "kB")
    mult = 1e3;
  else if (suffix == "MB")
    mult = 1e6;
  else if (suffix == "GB")
    mult = 1e9;
  else if (suffix == "TB")
    mult = 1e12;
  else
    RINGATTN_CHECK(suffix.empty() || suffix == "B", flag, ": unknown unit '", suffix, "' in '",
                   text, "' (expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)");
  return static_cast<int64_t>(value * mult);
}

int64_t peak_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

int64_t current_rss_bytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(bytes) >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

int allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) {
    return static_cast<int>(std::thread::hardware_concurrency());
  }
  return std::max(1, CPU_COUNT(&set));
}

int threads_per_rank(int local_ranks) {
  if (const char* env = std::getenv("RINGATTN_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  // mpirun may bind each rank to a core or socket: more threads than allowed CPUs only
  // time-share them.
  return std::max(1, std::min(cores / std::max(1, local_ranks), allowed_cpus()));
}

namespace {
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}
std::string number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}
}  // namespace

Json& Json::add(const std::string& key, double value) {
  items_.emplace_back(key, number(value));
  return *this;
}
Json& Json::add(const std::string& key, int64_t value) {
  items_.emplace_back(key, std::to_string(value));
  return *this;
}
Json& Json::add(const std::string& key, bool value) {
  items_.emplace_back(key, value ? "true" : "false");
  return *this;
}
Json& Json::add(const std::string& key, const std::string& value) {
  items_.emplace_back(key, quote(value));
  return *this;
}
Json& Json::add(const std::string& key, const Json& object) {
  items_.emplace_back(key, object.str());
  return *this;
}
Json& Json::add(const std::string& key, const std::vector<Json>& array) {
  std::string s = "[";
  for (size_t i = 0; i < array.size(); ++i) s += (i ? ", " : "") + array[i].str();
  items_.emplace_back(key, s + "]");
  return *this;
}
Json& Json::add(const std::string& key, const std::vector<double>& array) {
  std::string s = "[";
  for (size_t i = 0; i < array.size(); ++i) s += (i ? ", " : "") + number(array[i]);
  items_.emplace_back(key, s + "]");
  return *this;
}

std::string Json::str() const {
  std::string s = "{";
  for (size_t i = 0; i < items_.size(); ++i) {
    s += (i ? ", " : "") + quote(items_[i].first) + ": " + items_[i].second;
  }
  return s + "}";
}

void Json::write_file(const std::string& path) const {
  std::ofstream out(path);
  RINGATTN_CHECK_CODE(ErrorCode::kIo, out.good(), path, ": cannot write JSON");
  out << str() << "\n";
  RINGATTN_CHECK_CODE(ErrorCode::kIo, out.good(), path, ": write failed");
}

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0),
      start_(now_seconds()) {}

void Progress::update(int64_t done, const std::string& note) {
  if (!enabled_) return;
  const double elapsed = now_seconds() - start_;
  const double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  if (tty_) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(kWidth - filled), '.');
    std::fprintf(stderr, "\r%s [%s] %3.0f%% %s %.1fs   ", label_.c_str(), bar.c_str(), 100.0 * frac,
                 note.c_str(), elapsed);
  } else {
    std::fprintf(stderr, "%s %3.0f%% %s (%.1fs)\n", label_.c_str(), 100.0 * frac, note.c_str(),
                 elapsed);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace ringattn::launch
