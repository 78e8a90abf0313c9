// embed_plugin: a tiny asynchronous plugin in C++ on the plain C API, built
// by tests/test_system_library.py with nothing but
// `pkg-config --cflags --libs nbdkit-async` against an installed copy.
//
//   embed_plugin SOCKET_PATH
//
// A 16 MiB RAM disk; every op is answered later by a std::thread that
// drains a queue (nbdkit_reply from a thread that is not the loop's).
// Prints "ready" once listening; SIGTERM/SIGINT -> nbdkit_shutdown().

#include <nbdkit-async.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

std::vector<unsigned char> disk(16u << 20);

class Replier {
public:
  Replier() : thread_([this] { run(); }) {}
  ~Replier() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void post(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> g(m_);
      q_.push_back(std::move(f));
    }
    cv_.notify_one();
  }

private:
  void run() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [this] { return stop_ || !q_.empty(); });
      if (q_.empty())
        return;
      auto f = std::move(q_.front());
      q_.pop_front();
      lk.unlock();
      f();
      lk.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::thread thread_;
};

Replier *replier;

extern "C" {

void *p_open(void *ud, int, const char *) { return ud; }
int64_t p_size(void *) { return static_cast<int64_t>(disk.size()); }

int p_pread(nbdkit_op *op, void *, void *buf, uint32_t count, uint64_t offset,
            uint32_t) {
  replier->post([=] {
    std::memcpy(buf, disk.data() + offset, count);
    nbdkit_reply(op);
  });
  return 0;
}

int p_pwrite(nbdkit_op *op, void *, const void *buf, uint32_t count,
             uint64_t offset, uint32_t) {
  replier->post([=] {
    std::memcpy(disk.data() + offset, buf, count);
    nbdkit_reply(op);
  });
  return 0;
}

int p_flush(nbdkit_op *op, void *, uint32_t) {
  replier->post([=] { nbdkit_reply(op); });
  return 0;
}

void on_signal(int) { nbdkit_shutdown(); }

} // extern "C"

} // namespace

int main(int argc, char *argv[]) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: embed_plugin SOCKET_PATH\n");
    return 2;
  }
  Replier r;
  replier = &r;

  nbdkit_plugin_lowlevel plugin{};
  plugin.name = "embed_plugin_cxx";
  plugin.open = p_open;
  plugin.get_size = p_size;
  plugin.pread = p_pread;
  plugin.pwrite = p_pwrite;
  plugin.flush = p_flush;

  nbdkit_server *srv = nbdkit_server_new(&plugin, sizeof plugin, disk.data());
  if (srv == nullptr)
    return 1;
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  if (nbdkit_server_listen_unix(srv, argv[1]) < 0)
    return 1;
  std::printf("ready\n");
  std::fflush(stdout);
  int rc = nbdkit_main_loop(srv);
  nbdkit_server_free(srv);
  return rc == 0 ? 0 : 1;
}
