/* The wrapper's block-status members (tests/test_cpp_gateway_features.py).
 *
 * A 16 MiB disk: the first MiB of every 4 MiB is data (bytes 0x5a), the
 * rest holes. extents() answers reply_extents() (a std::vector), pread()
 * reply_read_extents() (a plain array). With --no-extents, can_extents()
 * says no and base:allocation must not be offered.
 *
 *   extents_plugin --unix PATH [--no-extents]
 * stdout: "ready" once listening. SIGINT/SIGTERM shut down.
 */
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <nbdkit-async.hpp>

namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t DISK = 16 * MiB;
constexpr uint64_t PERIOD = 4 * MiB;

bool is_data(uint64_t offset) { return offset % PERIOD < MiB; }

/* Runs from `offset` to `end`, cut where data and holes change. */
std::vector<nbdkit_extent> runs(uint64_t offset, uint64_t end)
{
  std::vector<nbdkit_extent> out;
  while (offset < end) {
    uint64_t boundary = offset / PERIOD * PERIOD + (is_data(offset) ? MiB
                                                                   : PERIOD);
    uint64_t n = std::min(boundary, end) - offset;
    out.push_back(nbdkit_extent{ n, is_data(offset)
                                      ? 0u
                                      : uint32_t(NBDKIT_EXTENT_HOLE |
                                                 NBDKIT_EXTENT_ZERO) });
    offset += n;
  }
  return out;
}

class sparse {
public:
  explicit sparse(bool offer) : offer_(offer) {}
  int64_t get_size() { return DISK; }
  bool can_extents() { return offer_; }
  void pread(nbdkit::op op, void *buf, uint32_t count, uint64_t offset,
             uint32_t)
  {
    auto v = runs(offset, offset + count);
    unsigned char *p = static_cast<unsigned char *>(buf);
    for (const auto &e : v) {
      std::memset(p, e.type ? 0 : 0x5a, e.length);
      p += e.length;
    }
    nbdkit_extent array[8];
    if (v.size() > 8) {
      op.reply_error(EINVAL);
      return;
    }
    std::copy(v.begin(), v.end(), array);
    op.reply_read_extents(array, v.size());
  }
  /* Always the rest of the disk: the library trims (and REQ_ONE). */
  void extents(nbdkit::op op, uint32_t, uint64_t offset, uint32_t)
  {
    op.reply_extents(runs(offset, DISK));
  }

private:
  bool offer_;
};

void on_signal(int) { nbdkit::shutdown_all(); }

} // namespace

int main(int argc, char *argv[])
{
  std::string path;
  bool offer = true;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--unix" && i + 1 < argc)
      path = argv[++i];
    else if (a == "--no-extents")
      offer = false;
    else
      return 2;
  }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  try {
    sparse plugin(offer);
    nbdkit::server srv(plugin, "extents-test");
    srv.listen_unix(path);
    std::cout << "ready" << std::endl;
    srv.main_loop();
  }
  catch (const std::exception &e) {
    std::cerr << "extents_plugin: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
