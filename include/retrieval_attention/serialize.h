// retrieval_attention/serialize.h -- the index file format shared by every index type.
//
// Layout (little-endian):
//   magic "RAIDX\0v1" (8 bytes) | u32 format version | 16-byte index type name (NUL padded)
//   | u32 ScalarKind | i64 payload bytes | payload | u64 FNV-1a checksum of everything before it.
// Contract
//   * save_index_file() writes to "<path>.tmp-<random>" and renames over <path> only after the whole file
//     is written and fsync'ed (then fsyncs the directory), so a failed save or a crash never replaces a good file
//     with a half-written one.
//   * read_index_file() validates size, magic, version, type name, scalar kind and checksum before handing
//     out the payload; every problem is a std::runtime_error that names the file and what is wrong.
//   * PayloadReader bounds-checks every read, so a payload that passes the checksum but is inconsistent
//     still cannot read out of range.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "scalar.h"

namespace retrieval_attention {

constexpr char kIndexMagic[8] = {'R', 'A', 'I', 'D', 'X', '\0', 'v', '1'};
constexpr uint32_t kIndexFormatVersion = 1;

inline uint64_t fnv1a64(const uint8_t* p, size_t n, uint64_t h = 1469598103934665603ull) {
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

class PayloadWriter {
 public:
  template <class V> void put(const V& v) { put_bytes(&v, sizeof(V)); }
  template <class V, class A> void put_vector(const std::vector<V, A>& v) {
    put<int64_t>(static_cast<int64_t>(v.size()));
    put_bytes(v.data(), v.size() * sizeof(V));
  }
  void put_bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  const std::vector<uint8_t>& bytes() const { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

class PayloadReader {
 public:
  PayloadReader(const uint8_t* p, size_t n, std::string source) : p_(p), n_(n), source_(std::move(source)) {}
  template <class V> V get() {
    V v;
    get_bytes(&v, sizeof(V));
    return v;
  }
  template <class V, class A = std::allocator<V>> std::vector<V, A> get_vector(int64_t max_elems) {
    const int64_t count = get<int64_t>();
    if (count < 0 || count > max_elems || static_cast<size_t>(count) * sizeof(V) > n_ - pos_) fail("array length out of range");
    std::vector<V, A> v(static_cast<size_t>(count));
    get_bytes(v.data(), v.size() * sizeof(V));
    return v;
  }
  void get_bytes(void* dst, size_t n) {
    if (n == 0) return;  // dst may be the null data() of an empty vector
    if (n > n_ - pos_) fail("payload truncated");
    std::memcpy(dst, p_ + pos_, n);
    pos_ += n;
  }
  bool at_end() const { return pos_ == n_; }
  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error("corrupt index file " + source_ + ": " + what); }

 private:
  const uint8_t* p_;
  size_t n_, pos_ = 0;
  std::string source_;
};

inline void save_index_file(const std::string& path, const std::string& type_name, ScalarKind kind, const std::vector<uint8_t>& payload) {
  if (type_name.size() >= 16) throw std::invalid_argument("index type name too long");
  std::vector<uint8_t> out;
  out.insert(out.end(), kIndexMagic, kIndexMagic + 8);
  auto put = [&out](const void* p, size_t n) { out.insert(out.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n); };
  put(&kIndexFormatVersion, 4);
  char name[16] = {0};
  std::memcpy(name, type_name.data(), type_name.size());
  put(name, 16);
  const uint32_t k = static_cast<uint32_t>(kind);
  put(&k, 4);
  const int64_t len = static_cast<int64_t>(payload.size());
  put(&len, 8);
  out.insert(out.end(), payload.begin(), payload.end());
  const uint64_t sum = fnv1a64(out.data(), out.size());
  put(&sum, 8);

  std::random_device rd;
  const std::string tmp = path + ".tmp-" + std::to_string(rd());
  {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot open " + tmp + " for writing");
    bool ok = std::fwrite(out.data(), 1, out.size(), f) == out.size() && std::fflush(f) == 0;
#if defined(__unix__) || defined(__APPLE__)
    ok = ok && ::fsync(::fileno(f)) == 0;  // the bytes are on disk before the rename makes them the file
#endif
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) {
      std::remove(tmp.c_str());
      throw std::runtime_error("failed writing index file " + tmp);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot move " + tmp + " to " + path);
  }
#if defined(__unix__) || defined(__APPLE__)
  {  // and the rename itself survives a crash: sync the directory entry (best effort)
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int fd = ::open(dir.c_str(), O_RDONLY);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
#endif
}

struct IndexFile {
  std::string type_name;
  ScalarKind kind;
  std::vector<uint8_t> payload;
};

inline IndexFile read_index_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open index file " + path);
  std::vector<uint8_t> all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto bad = [&path](const std::string& what) { return std::runtime_error("corrupt or foreign index file " + path + ": " + what); };
  constexpr size_t header = 8 + 4 + 16 + 4 + 8;
  if (all.size() < header + 8) throw bad("file too short");
  if (std::memcmp(all.data(), kIndexMagic, 8) != 0) throw bad("bad magic (not a retrieval_attention index)");
  uint32_t version;
  std::memcpy(&version, all.data() + 8, 4);
  if (version != kIndexFormatVersion) throw bad("unsupported format version " + std::to_string(version));
  int64_t len;
  std::memcpy(&len, all.data() + 32, 8);
  if (len < 0 || static_cast<uint64_t>(len) != all.size() - header - 8) throw bad("truncated or extended file (payload size mismatch)");
  uint64_t stored;
  std::memcpy(&stored, all.data() + all.size() - 8, 8);
  if (stored != fnv1a64(all.data(), all.size() - 8)) throw bad("checksum mismatch");
  IndexFile out;
  char name[17] = {0};
  std::memcpy(name, all.data() + 12, 16);
  out.type_name = name;
  uint32_t kind;
  std::memcpy(&kind, all.data() + 28, 4);
  if (kind > 2) throw bad("unknown scalar type");
  out.kind = static_cast<ScalarKind>(kind);
  out.payload.assign(all.begin() + header, all.end() - 8);
  return out;
}

}  // namespace retrieval_attention
