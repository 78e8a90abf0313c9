// asio-embedded: the NBD server driven from the host's own boost::asio
// io_context, instead of giving the library a thread with nbdkit_main_loop.
//
//   build/asio-embedded [--unix PATH] [--size N[K|M|G]] [--latency-ms N]
//
// Serves an in-memory disk whose I/O completes on asio timers after
// --latency-ms (default 0), like a gateway whose backend answers later.
// Everything runs on one io_context, on one thread (the main thread):
//
//   - the server's descriptor (nbdkit_server_fd) is watched with a
//     posix::stream_descriptor: async_wait(wait_read) -> nbdkit_server_process
//     -> re-arm;
//   - a steady_timer wakes the server when nbdkit_server_timeout_ms says a
//     timeout is due (handshake or request timeouts, shutdown ticks) even
//     if the descriptor stays quiet; 0 means "process again right away";
//   - the plugin's I/O is a steady_timer per request whose handler does the
//     memcpy and calls nbdkit_reply;
//   - SIGINT/SIGTERM (asio::signal_set) call nbdkit_server_shutdown, and the
//     loop keeps processing until nbdkit_server_process returns 0;
//     SIGUSR1 prints the server's counters to stderr.
//
// Why one thread: nbdkit_server_process must always be called from the
// same thread (plugin callbacks run inside it). A strand would serialise
// the calls but may run them on any thread of the io_context, which is not
// enough. Replies (nbdkit_reply) may come from any thread, so a plugin
// could complete its I/O on another io_context run by a pool; this one
// keeps a single thread, which comfortably holds thousands of requests in
// flight since none of them blocks it.
//
// Without --unix it listens on TCP 127.0.0.1:10809. The URI is printed
// first on stdout once the server is ready.

#include <nbdkit-async.h>

#include <boost/asio.hpp>

#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <inttypes.h>
#include <memory>
#include <string>

namespace asio = boost::asio;
using boost::system::error_code;

namespace {

// ------------------------------------------------------------------- disk

struct Disk {
  unsigned char *data = nullptr;
  uint64_t size = 0;
  std::chrono::milliseconds latency{0};
  asio::io_context *io = nullptr;
};

// Runs `done` on the io_context after the configured latency: the plugin's
// "backend". Called on the loop thread from inside nbdkit_server_process;
// returns at once.
void complete_later(Disk *d, std::function<void()> done) {
  if (d->latency.count() == 0) {
    asio::post(*d->io, std::move(done));
    return;
  }
  auto timer = std::make_shared<asio::steady_timer>(*d->io, d->latency);
  timer->async_wait([timer, done = std::move(done)](const error_code &) {
    // Even if the timer were cancelled the op must be answered once.
    done();
  });
}

void report(int r, const char *what) {
  if (r != 0)
    std::fprintf(stderr, "asio-embedded: %s: reply returned %d\n", what, r);
}

extern "C" {

void *d_open(void *user_data, int, const char *) { return user_data; }

int64_t d_get_size(void *h) {
  return static_cast<int64_t>(static_cast<Disk *>(h)->size);
}

int d_yes(void *) { return 1; }

int d_pread(nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
            uint32_t) {
  Disk *d = static_cast<Disk *>(h);
  complete_later(d, [=] {
    std::memcpy(buf, d->data + offset, count);
    report(nbdkit_reply(op), "pread");
  });
  return 0;
}

int d_pwrite(nbdkit_op *op, void *h, const void *buf, uint32_t count,
             uint64_t offset, uint32_t) {
  Disk *d = static_cast<Disk *>(h);
  complete_later(d, [=] {
    std::memcpy(d->data + offset, buf, count);
    report(nbdkit_reply(op), "pwrite");
  });
  return 0;
}

int d_flush(nbdkit_op *op, void *h, uint32_t) {
  // RAM is as durable as it gets: only the latency is paid.
  complete_later(static_cast<Disk *>(h),
                 [=] { report(nbdkit_reply(op), "flush"); });
  return 0;
}

int d_zero(nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t) {
  Disk *d = static_cast<Disk *>(h);
  complete_later(d, [=] {
    std::memset(d->data + offset, 0, count);
    report(nbdkit_reply(op), "zero");
  });
  return 0;
}

} // extern "C"

// ------------------------------------------------------ the embedded loop

class EmbeddedServer {
public:
  EmbeddedServer(asio::io_context &io, nbdkit_server *srv, int fd)
      : io_(io), srv_(srv), sd_(io, fd), timer_(io),
        signals_(io, SIGINT, SIGTERM, SIGUSR1) {}

  ~EmbeddedServer() {
    // The descriptor belongs to the library: stop watching it, never close it.
    error_code ec;
    sd_.cancel(ec);
    sd_.release();
  }

  void start() {
    wait_signal();
    process();
  }

  int status() const { return status_; }

private:
  void process() {
    if (finished_)
      return;
    int r = nbdkit_server_process(srv_);
    if (r <= 0) {
      if (r < 0) {
        std::fprintf(stderr, "asio-embedded: nbdkit_server_process: %s\n",
                     std::strerror(-r));
        status_ = EXIT_FAILURE;
      }
      finish();
      return;
    }
    schedule();
  }

  // After every turn: wake again on readiness, and on the library's timers.
  void schedule() {
    int ms = nbdkit_server_timeout_ms(srv_);
    if (ms == 0) {
      // Work is left over from this turn: come back right after other handlers.
      if (!posted_) {
        posted_ = true;
        asio::post(io_, [this] {
          posted_ = false;
          process();
        });
      }
    } else if (ms > 0) {
      // Waking early is harmless (process() then finds nothing and asks
      // again), waking late is not: keep an armed timer that fires no
      // later than needed, re-arm otherwise.
      auto due = asio::steady_timer::clock_type::now() +
                 std::chrono::milliseconds(ms);
      if (!timer_armed_ || timer_.expiry() > due) {
        timer_armed_ = true;
        timer_.expires_at(due);     // cancels an earlier wait, if any
        timer_.async_wait([this](const error_code &ec) {
          if (ec)
            return;                 // re-armed or finished
          timer_armed_ = false;
          process();
        });
      }
    }
    // ms < 0: only readiness matters; a timer still armed just wakes us once.
    if (!watching_) {
      watching_ = true;
      sd_.async_wait(asio::posix::stream_descriptor::wait_read,
                     [this](const error_code &ec) {
                       watching_ = false;
                       if (!ec)
                         process();
                     });
    }
  }

  void finish() {
    finished_ = true;
    error_code ec;
    sd_.cancel(ec);
    timer_.cancel();
    signals_.cancel(ec);
  }

  void wait_signal() {
    signals_.async_wait([this](const error_code &ec, int sig) {
      if (ec || finished_)
        return;
      if (sig == SIGUSR1)
        print_stats();
      else
        nbdkit_server_shutdown(srv_);   // then process() until it returns 0
      wait_signal();
    });
  }

  void print_stats() {
    nbdkit_stats st;
    if (nbdkit_server_stats(srv_, &st, sizeof st) != 0)
      return;
    std::fprintf(stderr,
                 "asio-embedded: connections %" PRIu64 " (total %" PRIu64
                 "), in flight %" PRIu64 ", reads %" PRIu64
                 ", writes %" PRIu64 ", bytes read %" PRIu64
                 ", bytes written %" PRIu64 ", errors %" PRIu64 "\n",
                 st.connections, st.connections_total, st.requests_in_flight,
                 st.requests[0], st.requests[1], st.bytes_read,
                 st.bytes_written, st.errors);
  }

  asio::io_context &io_;
  nbdkit_server *srv_;
  asio::posix::stream_descriptor sd_;
  asio::steady_timer timer_;
  asio::signal_set signals_;
  bool watching_ = false;
  bool timer_armed_ = false;
  bool posted_ = false;
  bool finished_ = false;
  int status_ = EXIT_SUCCESS;
};

// ------------------------------------------------------------------- main

uint64_t parse_size(const char *s) {
  char *end;
  errno = 0;
  uint64_t n = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s)
    return 0;
  switch (*end) {
  case 'K': case 'k': n <<= 10; end++; break;
  case 'M': case 'm': n <<= 20; end++; break;
  case 'G': case 'g': n <<= 30; end++; break;
  case 'T': case 't': n <<= 40; end++; break;
  default: break;
  }
  return *end == '\0' ? n : 0;
}

[[noreturn]] void usage() {
  std::fprintf(stderr, "usage: asio-embedded [--unix PATH] [--size N[K|M|G]]"
                       " [--latency-ms N]\n");
  std::exit(EXIT_FAILURE);
}

} // namespace

int main(int argc, char *argv[]) {
  const char *unix_path = nullptr;
  uint64_t size = 1ULL << 30;
  long latency_ms = 0;

  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (i + 1 >= argc)
      usage();
    const char *v = argv[++i];
    if (a == "--unix")
      unix_path = v;
    else if (a == "--size") {
      size = parse_size(v);
      if (size == 0)
        usage();
    } else if (a == "--latency-ms") {
      char *end;
      latency_ms = std::strtol(v, &end, 10);
      if (*end != '\0' || latency_ms < 0)
        usage();
    } else
      usage();
  }

  // Anonymous memory reads as zero and costs nothing until written.
  void *mem = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    std::perror("asio-embedded: allocating the disk");
    return EXIT_FAILURE;
  }

  asio::io_context io(1);   // one thread runs it: no internal locking needed
  Disk disk;
  disk.data = static_cast<unsigned char *>(mem);
  disk.size = size;
  disk.latency = std::chrono::milliseconds(latency_ms);
  disk.io = &io;

  nbdkit_plugin_lowlevel plugin{};
  plugin.name = "asio-embedded";
  plugin.open = d_open;
  plugin.get_size = d_get_size;
  plugin.can_multi_conn = d_yes;   // one disk behind every connection
  plugin.pread = d_pread;
  plugin.pwrite = d_pwrite;
  plugin.flush = d_flush;
  plugin.trim = d_zero;
  plugin.zero = d_zero;

  nbdkit_server *srv = nbdkit_server_new(&plugin, sizeof plugin, &disk);
  if (srv == nullptr)
    return EXIT_FAILURE;
  // On SIGINT/SIGTERM, requests in flight get 5 s to finish before their
  // clients are answered ESHUTDOWN: a stuck backend cannot hold the exit.
  nbdkit_server_set_shutdown_grace_ms(srv, 5000);

  std::string uri;
  if (unix_path) {
    if (nbdkit_server_listen_unix(srv, unix_path) < 0)
      return EXIT_FAILURE;
    uri = std::string("nbd+unix:///?socket=") + unix_path;
  } else {
    int port = nbdkit_server_listen_tcp(srv, "127.0.0.1", 10809);
    if (port < 0)
      return EXIT_FAILURE;
    uri = "nbd://127.0.0.1:" + std::to_string(port) + "/";
  }

  int fd = nbdkit_server_fd(srv);
  if (fd < 0) {
    std::fprintf(stderr, "asio-embedded: nbdkit_server_fd: %s\n",
                 std::strerror(-fd));
    return EXIT_FAILURE;
  }

  int status;
  {
    // Signals are handled before the URI is printed: whoever reads it may
    // signal us at once.
    EmbeddedServer server(io, srv, fd);
    server.start();
    std::printf("%s\n", uri.c_str());
    std::fflush(stdout);

    // Returns when nothing is left: the server finished (every op was
    // answered) and the watchers were cancelled.
    io.run();
    status = server.status();
  }

  nbdkit_server_free(srv);
  munmap(mem, size);
  return status;
}
