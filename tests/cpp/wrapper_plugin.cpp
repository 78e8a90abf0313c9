/* wrapper_plugin: drives include/nbdkit-async.hpp from a real server, for
 * tests/test_cpp_wrapper.py. No asio here: a plain worker thread answers
 * ops, which also proves replies from another thread.
 *
 *   wrapper_plugin --unix PATH [--minimal] [--refuse]
 *
 * A 16 MiB disk, zero-filled. What happens to a request depends on the
 * MiB it starts in:
 *
 *   0-7   stored data, answered by the worker thread
 *   8     pread drops the op without replying            -> EIO
 *   9     pread throws before handing the op on          -> EIO
 *   10    pread hands the op to the worker, then throws  -> data (one reply)
 *   11    pread: reply_error(std::errc), pwrite: reply_error(error_code)
 *                                                        -> EPERM / ENOSPC
 *   12    held until cancel(), which answers ECANCELED
 *   13    reply_error with a non-errno error_code        -> EIO
 *   14    replied twice: the second is refused and logged -> data
 *   15    read: a copy lent with reply_read_nocopy, owned by a shared_ptr
 *         that prints "lent released" when the library lets go -> data
 *
 * --minimal serves a class with only get_size and pread (so read-only,
 * nothing else offered). --refuse makes open throw (client refused).
 *
 * stdout: "ready" once listening; "held", "cancel", "open", "close" as
 * those happen. SIGINT/SIGTERM shut down through nbdkit::shutdown_all().
 */
#include <getopt.h>
#include <signal.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <iostream>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <nbdkit-async.hpp>

static_assert(!std::is_copy_constructible_v<nbdkit::op>, "op is move-only");
static_assert(std::is_nothrow_move_constructible_v<nbdkit::op>);

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t DISK = 16 * MiB;

static void say(const char *what)
{
  std::cout << what << std::endl;   /* flushed: the test reads it live */
}

/* One thread running jobs in order: the "asynchronous backend". */
class worker {
public:
  worker() : thread_([this] { run(); }) {}
  ~worker()
  {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

  void submit(nbdkit::op op, std::function<void(nbdkit::op &)> fn)
  {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(job{std::move(op), std::move(fn)});
    }
    cv_.notify_one();
  }

private:
  struct job {
    nbdkit::op op;
    std::function<void(nbdkit::op &)> fn;
  };

  void run()
  {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty())
        return;
      job j = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      j.fn(j.op);
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<job> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

/* A category that is not errno-based: must become EIO. */
class test_category : public std::error_category {
public:
  const char *name() const noexcept override { return "test"; }
  std::string message(int) const override { return "test error"; }
};

class plugin {
public:
  explicit plugin(bool refuse) : data_(DISK), refuse_(refuse) {}

  void open(bool /*readonly*/, std::string_view /*export_name*/)
  {
    if (refuse_)
      throw std::system_error(EACCES, std::generic_category(), "refused");
    say("open");
  }
  void close() { say("close"); }

  int64_t get_size() const { return DISK; }
  bool can_multi_conn() const { return true; }
  nbdkit::fua_mode can_fua() const { return nbdkit::fua_mode::native; }

  void pread(nbdkit::op op, void *buf, uint32_t count, uint64_t offset,
             uint32_t)
  {
    switch (offset / MiB) {
    case 8:
      return;                   /* op destroyed here, unanswered */
    case 9:
      throw std::runtime_error("pread failed before hand-off");
    case 10:
      worker_.submit(std::move(op), [this, count, offset](nbdkit::op &o) {
        std::vector<unsigned char> copy(count);
        copy_out(copy.data(), count, offset);
        o.reply_read(copy.data(), copy.size());
      });
      throw std::runtime_error("pread failed after hand-off");
    case 11:
      op.reply_error(std::errc::operation_not_permitted);
      return;
    case 12:
      hold(std::move(op));
      return;
    case 13:
      op.reply_error(std::error_code(42, category_));
      return;
    case 14:
      copy_out(buf, count, offset);
      op.reply();
      if (op.reply() != -EINVAL)        /* refused by the wrapper */
        std::cerr << "TEST-ERROR: second reply not refused\n";
      return;
    case 15:
      worker_.submit(std::move(op), [this, count, offset](nbdkit::op &o) {
        std::shared_ptr<std::vector<unsigned char>> copy(
            new std::vector<unsigned char>(count),
            [](std::vector<unsigned char> *v) {
              say("lent released");
              delete v;
            });
        copy_out(copy->data(), count, offset);
        o.reply_read_nocopy(copy->data(), copy->size(), copy);
      });
      return;
    }
    worker_.submit(std::move(op), [this, buf, count, offset](nbdkit::op &o) {
      copy_out(buf, count, offset);
      o.reply();
    });
  }

  void pwrite(nbdkit::op op, const void *buf, uint32_t count, uint64_t offset,
              uint32_t)
  {
    if (offset / MiB == 11) {
      op.reply_error(std::make_error_code(std::errc::no_space_on_device));
      return;
    }
    worker_.submit(std::move(op), [this, buf, count, offset](nbdkit::op &o) {
      std::lock_guard<std::mutex> lock(data_mutex_);
      std::memcpy(data_.data() + offset, buf, count);
      o.reply();
    });
  }

  void flush(nbdkit::op op, uint32_t) { op.reply(); }

  /* Loop thread: the client left or the server stops. */
  void cancel(nbdkit::op_id id)
  {
    say("cancel");
    auto it = held_.find(id);
    if (it != held_.end()) {
      it->second.reply_error(ECANCELED);
      held_.erase(it);
    }
  }

private:
  void hold(nbdkit::op op)      /* loop thread, like cancel */
  {
    nbdkit::op_id id = op.id();
    held_.emplace(id, std::move(op));
    say("held");
  }

  void copy_out(void *buf, uint32_t count, uint64_t offset)
  {
    std::lock_guard<std::mutex> lock(data_mutex_);
    std::memcpy(buf, data_.data() + offset, count);
  }

  std::mutex data_mutex_;
  std::vector<unsigned char> data_;
  bool refuse_;
  test_category category_;
  std::unordered_map<nbdkit::op_id, nbdkit::op> held_;
  worker worker_;               /* last: joined before the rest goes */
};

/* Nothing but the two required members: read-only, nothing else offered. */
class minimal {
public:
  int64_t get_size() { return DISK; }
  void pread(nbdkit::op op, void *buf, uint32_t count, uint64_t, uint32_t)
  {
    std::memset(buf, 0xab, count);
    op.reply();
  }
};

static void on_signal(int)
{
  nbdkit::shutdown_all();       /* async-signal-safe */
}

template <class P>
static int serve(P &p, const std::string &path)
{
  nbdkit::server srv(p, "wrapper-test");
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  srv.listen_unix(path);
  say("ready");
  srv.main_loop();
  return 0;
}

int main(int argc, char *argv[])
{
  std::string path;
  bool is_minimal = false, refuse = false;
  static const option opts[] = {
    { "unix", required_argument, nullptr, 'u' },
    { "minimal", no_argument, nullptr, 'm' },
    { "refuse", no_argument, nullptr, 'r' },
    { nullptr, 0, nullptr, 0 },
  };
  for (int c; (c = getopt_long(argc, argv, "", opts, nullptr)) != -1;) {
    switch (c) {
    case 'u': path = optarg; break;
    case 'm': is_minimal = true; break;
    case 'r': refuse = true; break;
    default: return 2;
    }
  }
  if (path.empty())
    return 2;
  try {
    if (is_minimal) {
      minimal m;
      return serve(m, path);
    }
    plugin p(refuse);
    return serve(p, path);
  }
  catch (const std::exception &e) {
    std::cerr << "wrapper_plugin: " << e.what() << "\n";
    return 1;
  }
}
