#pragma once
/// NumPy .npy headers (format versions 1.0-3.0): parse and format. The data of an array
/// starts at data_offset; only C-order arrays are produced, and readers reject Fortran order.

#include <cstdint>
#include <string>
#include <vector>

namespace ringattn::npy {

struct Header {
  std::string descr;  ///< e.g. "<f4"
  bool fortran_order = false;
  std::vector<int64_t> shape;
  size_t data_offset = 0;  ///< bytes before the first element
  int64_t numel() const;
  /// "(2, 128, 8, 64)" for messages.
  std::string shape_string() const;
};

/// Parses the header at the start of `path`. Throws Error (kIo when the file cannot be read,
/// kInvalidArgument when it is not a valid .npy), naming the file.
Header read_header(const std::string& path);

/// Parses a header from the first bytes of a file (at least the whole header).
Header parse_header(const std::string& bytes, const std::string& what);

/// A version 1.0 header for a little-endian C-order array, padded to a multiple of 64 bytes.
std::string format_header(const std::vector<int64_t>& shape, const std::string& descr = "<f4");

/// Whole-file helpers for tests and small tools (f32 only).
void write_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data);
std::vector<float> read_f32(const std::string& path, std::vector<int64_t>* shape);

}  // namespace ringattn::npy
