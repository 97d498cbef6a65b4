#include "runtime/src/npy.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "ringattn/error.h"

namespace ringattn::npy {

int64_t Header::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Header::shape_string() const {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ',';
  os << ')';
  return os.str();
}

namespace {

// Value of key `key` in the header dict literal, as raw text up to the next top-level comma.
std::string dict_value(const std::string& dict, const std::string& key, const std::string& what) {
  const std::string quoted[2] = {"'" + key + "'", "\"" + key + "\""};
  size_t pos = std::string::npos;
  for (const std::string& q : quoted) {
    pos = dict.find(q);
    if (pos != std::string::npos) {
      pos += q.size();
      break;
    }
  }
  RINGATTN_CHECK(pos != std::string::npos, what, ": not a .npy file (header has no '", key, "')");
  pos = dict.find(':', pos);
  RINGATTN_CHECK(pos != std::string::npos, what, ": malformed .npy header");
  ++pos;
  int depth = 0;
  size_t end = pos;
  for (; end < dict.size(); ++end) {
    const char c = dict[end];
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if ((c == ',' && depth == 0) || (c == '}' && depth == 0) || depth < 0) break;
  }
  std::string v = dict.substr(pos, end - pos);
  const size_t a = v.find_first_not_of(" \t");
  const size_t b = v.find_last_not_of(" \t");
  return a == std::string::npos ? std::string() : v.substr(a, b - a + 1);
}

}  // namespace

Header parse_header(const std::string& bytes, const std::string& what) {
  static const char kMagic[] = "\x93NUMPY";
  RINGATTN_CHECK(bytes.size() >= 10 && std::memcmp(bytes.data(), kMagic, 6) == 0, what,
                 ": not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, prefix = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) |
                 (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    prefix = 10;
  } else if (major == 2 || major == 3) {
    RINGATTN_CHECK(bytes.size() >= 12, what, ": truncated .npy header");
    for (int i = 0; i < 4; ++i) {
      header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    }
    prefix = 12;
  } else {
    RINGATTN_THROW(ErrorCode::kInvalidArgument, what, ": unsupported .npy format version ", major);
  }
  RINGATTN_CHECK(bytes.size() >= prefix + header_len, what, ": truncated .npy header");
  const std::string dict = bytes.substr(prefix, header_len);
  Header h;
  h.data_offset = prefix + header_len;
  std::string descr = dict_value(dict, "descr", what);
  RINGATTN_CHECK(descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"'), what,
                 ": malformed descr ", descr);
  h.descr = descr.substr(1, descr.size() - 2);
  const std::string fo = dict_value(dict, "fortran_order", what);
  RINGATTN_CHECK(fo == "False" || fo == "True", what, ": malformed fortran_order ", fo);
  h.fortran_order = fo == "True";
  const std::string shape = dict_value(dict, "shape", what);
  RINGATTN_CHECK(shape.size() >= 2 && shape.front() == '(' && shape.back() == ')', what,
                 ": malformed shape ", shape);
  std::string inner = shape.substr(1, shape.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t a = item.find_first_not_of(" \t");
    if (a == std::string::npos) continue;
    const std::string t = item.substr(a, item.find_last_not_of(" \t") - a + 1);
    RINGATTN_CHECK(!t.empty() && std::all_of(t.begin(), t.end(),
                                             [](char c) {
                                               return std::isdigit(static_cast<unsigned char>(c)) !=
                                                          0 ||
                                                      c == 'L';
                                             }),
                   what, ": malformed shape ", shape);
    h.shape.push_back(std::stoll(t));
  }
  return h;
}

Header read_header(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  RINGATTN_CHECK_CODE(ErrorCode::kIo, in.good(), path, ": cannot open (", std::strerror(errno),
                      ")");
  std::string bytes(12, '\0');
  in.read(&bytes[0], 12);
  bytes.resize(static_cast<size_t>(in.gcount()));
  // Read exactly the header: its length sits in the prefix.
  RINGATTN_CHECK(bytes.size() >= 10 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0, path,
                 ": not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t total = 0;
  if (major == 1) {
    total = 10 + (static_cast<unsigned char>(bytes[8]) |
                  (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8));
  } else {
    size_t len = 0;
    for (int i = 0; i < 4 && 8 + i < static_cast<int>(bytes.size()); ++i) {
      len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    }
    total = 12 + len;
  }
  RINGATTN_CHECK(total < (1u << 24), path, ": implausible .npy header length ", total);
  std::string all(total, '\0');
  in.seekg(0);
  in.read(&all[0], static_cast<std::streamsize>(total));
  all.resize(static_cast<size_t>(in.gcount()));
  return parse_header(all, path);
}

std::string format_header(const std::vector<int64_t>& shape, const std::string& descr) {
  std::ostringstream os;
  os << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ',';
  os << "), }";
  std::string dict = os.str();
  // magic(6) + version(2) + len(2) + dict + padding + '\n' is a multiple of 64.
  const size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(dict.size() & 0xff));
  out.push_back(static_cast<char>((dict.size() >> 8) & 0xff));
  return out + dict;
}

void write_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  RINGATTN_CHECK_CODE(ErrorCode::kIo, out.good(), path, ": cannot create (", std::strerror(errno),
                      ")");
  const std::string h = format_header(shape);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * 4));
  RINGATTN_CHECK_CODE(ErrorCode::kIo, out.good(), path, ": write failed");
}

std::vector<float> read_f32(const std::string& path, std::vector<int64_t>* shape) {
  const Header h = read_header(path);
  RINGATTN_CHECK(h.descr == "<f4" && !h.fortran_order, path,
                 ": expected little-endian f32 C-order data ('<f4'), got '", h.descr, "'",
                 h.fortran_order ? " in Fortran order" : "");
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(h.data_offset));
  std::vector<float> data(static_cast<size_t>(h.numel()));
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size() * 4));
  RINGATTN_CHECK_CODE(ErrorCode::kIo, in.gcount() == static_cast<std::streamsize>(data.size() * 4),
                      path, ": file is shorter than its shape ", h.shape_string(), " says");
  if (shape != nullptr) *shape = h.shape;
  return data;
}

}  // namespace ringattn::npy
