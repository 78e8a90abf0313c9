/* asio-memdisk: an in-memory disk served over NBD, the boost::asio way.
 *
 * The shortest complete picture of libnbdkit-async inside an asio program:
 *
 *   - The plugin is a plain class (see nbdkit-async.hpp). Each I/O member
 *     receives an nbdkit::op, arms an asio::steady_timer for the artificial
 *     latency and returns at once: it runs on the NBD event-loop thread,
 *     which must never wait.
 *   - The timer's completion handler runs on one of a few asio pool
 *     threads; it copies the data and answers the op.
 *   - main() runs the NBD event loop on the main thread beside the pool.
 *
 * Thousands of requests can wait for their timers at once; no thread is
 * tied to any of them.
 *
 *   build/asio-memdisk [--unix PATH] [--tcp HOST:PORT] [--size N[K|M|G]]
 *                      [--latency-ms N] [--threads N]
 */
#include <getopt.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <shared_mutex>
#include <string>

#include <boost/asio.hpp>

#include <nbdkit-async.hpp>

namespace asio = boost::asio;

class memdisk {
public:
  memdisk(asio::any_io_executor ex, uint64_t size,
          std::chrono::milliseconds latency)
    : ex_(std::move(ex)), latency_(latency), size_(size),
      /* calloc maps zero pages lazily: a big disk costs what is written. */
      data_(static_cast<unsigned char *>(std::calloc(1, size)))
  {
    if (!data_)
      throw std::bad_alloc();
  }

  /* Called on the event-loop thread, like every member below. */
  int64_t get_size() const { return static_cast<int64_t>(size_); }
  bool can_multi_conn() const { return true; }  /* one disk for all clients */

  void pread(nbdkit::op op, void *buf, uint32_t count, uint64_t offset,
             uint32_t /*flags*/)
  {
    /* buf belongs to the library and stays valid until op is answered. */
    after_latency(std::move(op), [=] {
      std::shared_lock lock(mutex_);
      std::memcpy(buf, data_.get() + offset, count);
    });
  }

  void pwrite(nbdkit::op op, const void *buf, uint32_t count, uint64_t offset,
              uint32_t /*flags*/)
  {
    after_latency(std::move(op), [=] {
      std::unique_lock lock(mutex_);
      std::memcpy(data_.get() + offset, buf, count);
    });
  }

  void zero(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t /*flags*/)
  {
    after_latency(std::move(op), [=] {
      std::unique_lock lock(mutex_);
      std::memset(data_.get() + offset, 0, count);
    });
  }

  /* A trimmed range may read back as anything; zeroes will do. */
  void trim(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t flags)
  {
    zero(std::move(op), count, offset, flags);
  }

  /* RAM is as durable as it gets: only the latency is left to pay. */
  void flush(nbdkit::op op, uint32_t /*flags*/)
  {
    after_latency(std::move(op), [] {});
  }

private:
  /* Runs `work` on the pool once the latency has passed, then answers op.
   * The timer lives inside its own handler; the op moves along with it.
   * If the handler is destroyed unrun (the pool stopped), the op answers
   * EIO by itself.
   */
  template <class Work>
  void after_latency(nbdkit::op op, Work work)
  {
    auto timer = std::make_unique<asio::steady_timer>(ex_, latency_);
    auto &t = *timer;
    t.async_wait([timer = std::move(timer), op = std::move(op),
                  work](boost::system::error_code ec) mutable {
      if (ec) {
        op.reply_error(ec);
        return;
      }
      work();
      op.reply();
    });
  }

  struct free_delete {
    void operator()(void *p) const { std::free(p); }
  };

  asio::any_io_executor ex_;
  std::chrono::milliseconds latency_;
  uint64_t size_;
  std::unique_ptr<unsigned char[], free_delete> data_;
  std::shared_mutex mutex_;  /* readers share, writers exclude */
};

[[noreturn]] static void usage()
{
  std::cerr << "usage: asio-memdisk [--unix PATH] [--tcp HOST:PORT]"
               " [--size N[K|M|G]]\n"
               "                    [--latency-ms N] [--threads N]\n";
  std::exit(EXIT_FAILURE);
}

static uint64_t parse_size(const char *s)
{
  char *end;
  uint64_t n = std::strtoull(s, &end, 10);
  switch (*end) {
  case 'K': case 'k': return n << 10;
  case 'M': case 'm': return n << 20;
  case 'G': case 'g': return n << 30;
  case '\0': return n;
  default: usage();
  }
}

int main(int argc, char *argv[])
{
  std::string unix_path, tcp;
  uint64_t size = 1ULL << 30;
  long latency_ms = 0, threads = 2;

  static const option opts[] = {
    { "unix", required_argument, nullptr, 'u' },
    { "tcp", required_argument, nullptr, 't' },
    { "size", required_argument, nullptr, 's' },
    { "latency-ms", required_argument, nullptr, 'l' },
    { "threads", required_argument, nullptr, 'T' },
    { nullptr, 0, nullptr, 0 },
  };
  for (int c; (c = getopt_long(argc, argv, "", opts, nullptr)) != -1;) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 's': size = parse_size(optarg); break;
    case 'l': latency_ms = std::atol(optarg); break;
    case 'T': threads = std::atol(optarg); break;
    default: usage();
    }
  }
  if (optind != argc || latency_ms < 0 || threads < 1)
    usage();
  if (unix_path.empty() && tcp.empty())
    tcp = "127.0.0.1:10809";

  try {
    /* The pool outlives everything below it: declared first, so it is
     * destroyed last, after the server released the ops.
     */
    asio::thread_pool pool(static_cast<std::size_t>(threads));
    memdisk disk(pool.get_executor(), size,
                 std::chrono::milliseconds(latency_ms));
    nbdkit::server srv(disk, "asio-memdisk");
    srv.export_description("in-memory disk (libnbdkit-async asio example)");
    // On SIGINT/SIGTERM, requests in flight get 5 s to finish before their
    // clients are answered ESHUTDOWN: a stuck backend cannot hold the exit.
    srv.shutdown_grace(std::chrono::seconds(5));

    /* Before the URI is printed: whoever reads it may signal us at once.
     * The handler runs on a pool thread; shutdown() is thread-safe.
     */
    asio::signal_set signals(pool, SIGINT, SIGTERM);
    signals.async_wait([&srv](boost::system::error_code ec, int) {
      if (!ec)
        srv.shutdown();
    });

    if (!unix_path.empty()) {
      srv.listen_unix(unix_path);
      std::cout << "nbd+unix:///?socket=" << unix_path << std::endl;
    }
    if (!tcp.empty()) {
      auto colon = tcp.rfind(':');
      if (colon == std::string::npos)
        usage();
      std::string host = tcp.substr(0, colon);
      auto port = srv.listen_tcp(host, static_cast<uint16_t>(
                                   std::atoi(tcp.c_str() + colon + 1)));
      std::cout << "nbd://" << host << ":" << port << "/" << std::endl;
    }

    /* Returns once shutdown was asked and every op in flight answered. */
    srv.main_loop();

    /* The last pending work: now join() can return. We are exiting
     * anyway: a second signal must not turn that into a kill.
     */
    signals.clear();
    std::signal(SIGINT, SIG_IGN);
    std::signal(SIGTERM, SIG_IGN);
    pool.join();
  }
  catch (const std::exception &e) {
    std::cerr << "asio-memdisk: " << e.what() << "\n";
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}
