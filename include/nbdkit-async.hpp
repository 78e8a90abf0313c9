/*
 * nbdkit-async.hpp: a header-only C++17 wrapper over <nbdkit-async.h>.
 *
 * Three pieces, each a thin layer over the C API (read nbdkit-async.h for
 * the full contract; the rules below are the same rules in C++ words):
 *
 *   nbdkit::op      one NBD request in flight, move-only. Answer it once
 *                   with reply(), reply_read(), reply_read_nocopy(),
 *                   reply_read_extents(), reply_extents() or
 *                   reply_error(), from any thread. Destroyed unanswered,
 *                   it answers EIO and logs.
 *
 *   plugin class    any class of yours with the member functions below; a
 *                   member you define is offered to clients, one you leave
 *                   out is not (exactly like a NULL callback in C).
 *
 *   nbdkit::server  owns an nbdkit_server (RAII): configure it, run
 *                   main_loop() on a thread of your choice, stop it with
 *                   shutdown() from any thread.
 *
 * Threading: every plugin member function is called on the thread running
 * server::main_loop() (the event-loop thread) and must return at once: start
 * the work (post it to your asio executor, queue it, ...) and answer the op
 * later from whichever thread finishes it. No exception ever reaches the
 * library: the adaptor catches it, logs it through the library's log
 * (nbdkit_set_log_callback, else stderr), and the op is answered EIO
 * (unless your code had already handed it on, in which case its new owner
 * answers it).
 *
 * A plugin class: get_size and pread are required, every other member is
 * optional. Names must not be overloaded (they are looked up by name).
 *
 *   class my_disk {
 *   public:
 *     int64_t get_size();
 *     void pread(nbdkit::op op, void *buf, uint32_t count,
 *                uint64_t offset, uint32_t flags);
 *     void pwrite(nbdkit::op op, const void *buf, uint32_t count,
 *                 uint64_t offset, uint32_t flags);
 *     void flush(nbdkit::op op, uint32_t flags);
 *     void trim(nbdkit::op op, uint32_t count, uint64_t offset,
 *               uint32_t flags);
 *     void zero(nbdkit::op op, uint32_t count, uint64_t offset,
 *               uint32_t flags);
 *     void cache(nbdkit::op op, uint32_t count, uint64_t offset,
 *                uint32_t flags);
 *     void extents(nbdkit::op op, uint32_t count, uint64_t offset,
 *                  uint32_t flags);
 *     void cancel(nbdkit::op_id id);
 *     void open(bool readonly, std::string_view export_name);
 *     void close();
 *     bool can_write();  bool can_flush();  bool can_trim();  bool can_zero();
 *     bool can_multi_conn();  bool can_cache();
 *     nbdkit::fua_mode can_fua();
 *     bool can_extents();
 *   };
 *
 * I/O members take the op by value: it is theirs. `buf` belongs to the
 * library and stays valid until the op is answered (fill it, then reply();
 * or reply_read() from a buffer of your own). `flags` holds NBDKIT_FLAG_FUA
 * (only if can_fua() says native), for zero NBDKIT_FLAG_MAY_TRIM, and for
 * extents NBDKIT_FLAG_REQ_ONE.
 *
 * extents (block status, the base:allocation meta context) is answered
 * with reply_extents(): runs of (length, NBDKIT_EXTENT_HOLE/ZERO flags)
 * from the op's offset. A pread may answer reply_read_extents() to say
 * which parts of its (filled, zeroed there) buffer are holes.
 * can_extents() differs from the other can_*: the C API has no such
 * callback (the library offers base:allocation exactly when `extents`
 * exists), so it is asked once, when the server is constructed; false
 * leaves extents out as if it were not defined.
 *
 * can_* answer once per client connection; left out, the answer follows
 * from which I/O members exist (can_write: pwrite defined, and so on).
 * A can_* or get_size that throws refuses the client.
 *
 * open/close run once per client connection (open also briefly when a
 * client only asks about the export). open throws to refuse the client
 * (with a std::system_error's errno, else EIO). close comes after every op
 * of the connection has been answered.
 *
 * cancel(id) says nobody wants the op with that id (op::id()) any more:
 * its client left, or the server is shutting down. At most once per op,
 * on the event-loop thread, possibly while another of your threads is
 * answering it (look it up under your own lock; not finding it is fine).
 * It answers nothing by itself: the op is still answered exactly once by
 * whoever holds it (ECANCELED is customary; finishing normally is fine).
 *
 * One plugin object serves every client connection of its server, so it
 * must outlive the server. (A plugin that needs an object per connection
 * uses the C API's open/close handles directly.)
 */

#ifndef NBDKIT_ASYNC_HPP
#define NBDKIT_ASYNC_HPP

#include <nbdkit-async.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iterator>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

namespace nbdkit {

/* The errno an error_code stands for: its own value for errno-based
 * categories, its generic equivalent when it has one, EIO otherwise (and
 * for an empty error_code, which is no error to report).
 */
inline int to_errno(const std::error_code &ec) noexcept
{
  if (!ec)
    return EIO;
  if (ec.category() == std::generic_category() ||
      ec.category() == std::system_category())
    return ec.value();
  std::error_condition cond = ec.default_error_condition();
  if (cond.category() == std::generic_category() && cond.value() > 0)
    return cond.value();
  return EIO;
}

namespace detail {

/* One line through the library's log (the host's log callback, or
 * stderr), so the wrapper's lines sit beside the library's.
 */
inline void log_error(const char *what, const char *more = nullptr) noexcept
{
  char line[512];
  std::snprintf(line, sizeof line, "nbdkit-async++: %s%s%s", what,
                more ? ": " : "", more ? more : "");
  nbdkit_log(NBDKIT_LOG_ERROR, line);
}

/* While an I/O member runs on this thread: ops its exception abandons are
 * counted here and reported after the exception itself, cause first.
 */
struct io_scope_state {
  int depth = 0;
  int abandoned = 0;
};
inline thread_local io_scope_state io_scope;

inline void log_abandoned() noexcept
{
  if (io_scope.abandoned > 0)
    log_error(io_scope.abandoned == 1
              ? "op abandoned by an exception; answered EIO"
              : "ops abandoned by an exception; answered EIO");
  io_scope.abandoned = 0;
}

/* Logs the exception being handled; returns the errno it stands for. */
inline int log_current_exception(const char *where) noexcept
{
  char what[256];
  int err = EIO;
  try {
    throw;
  }
  catch (const std::system_error &e) {
    err = to_errno(e.code());
    std::snprintf(what, sizeof what, "exception in %s", where);
    log_error(what, e.what());
  }
  catch (const std::exception &e) {
    std::snprintf(what, sizeof what, "exception in %s", where);
    log_error(what, e.what());
  }
  catch (...) {
    std::snprintf(what, sizeof what, "unknown exception in %s", where);
    log_error(what);
  }
  return err;
}

} // namespace detail

/* Identifies an op without owning it: what `cancel` receives, and what
 * op::id() returns, so a plugin can find the op it holds. Hashable.
 */
enum class op_id : std::uintptr_t {};

/* An NBD request in flight, handed to a plugin's I/O member function.
 *
 * Move-only, like std::unique_ptr: whoever holds it owns the duty to answer
 * it exactly once, with one of the reply functions, from any thread. After
 * a reply the op is empty; the buffers the I/O call received are no longer
 * yours to touch. Capture it in a mutable lambda (`[op = std::move(op)]`)
 * to carry it to an asio handler; std::function cannot hold it.
 *
 * Destroyed while still holding an unanswered request (dropped by mistake,
 * a handler destroyed unrun, an exception), it answers EIO and logs, so a
 * lost op never leaves a client waiting.
 *
 * One op object must not be used by two threads at once; handing it from
 * thread to thread (by moving it) is fine.
 */
class op {
public:
  op() noexcept = default;
  explicit op(nbdkit_op *raw) noexcept : raw_(raw) {}
  op(op &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
  op &operator=(op &&other) noexcept
  {
    if (this != &other) {
      abandon();
      raw_ = std::exchange(other.raw_, nullptr);
    }
    return *this;
  }
  op(const op &) = delete;
  op &operator=(const op &) = delete;
  ~op() { abandon(); }

  /* True while the op still waits for its reply. */
  explicit operator bool() const noexcept { return raw_ != nullptr; }
  op_id id() const noexcept
  {
    return static_cast<op_id>(reinterpret_cast<std::uintptr_t>(raw_));
  }

  /* Success. For a read, the buffer given to pread holds the data by now.
   * Each reply returns 0, or a negative errno when the library could not
   * deliver it (the client or server is gone; nothing to do about it).
   * Replying to an empty op returns -EINVAL and logs.
   */
  int reply() noexcept
  {
    nbdkit_op *raw = take("reply");
    return raw ? nbdkit_reply(raw) : -EINVAL;
  }

  /* Success of a read with data kept elsewhere: `count` bytes are copied
   * before it returns. `count` must be the count pread received.
   */
  int reply_read(const void *data, std::size_t count) noexcept
  {
    nbdkit_op *raw = take("reply_read");
    if (raw == nullptr)
      return -EINVAL;
    if (count > UINT32_MAX)
      return nbdkit_reply_error(raw, EIO);
    return nbdkit_reply_read(raw, data, static_cast<uint32_t>(count));
  }

  /* Success of a read with data lent, not copied: the library sends the
   * `count` bytes at `data` from where they are and calls release(ctx)
   * exactly once when it is done with them, whatever becomes of the reply
   * (see nbdkit_reply_read_nocopy). `count` must be the count pread
   * received.
   */
  int reply_read_nocopy(const void *data, std::size_t count,
                        void (*release)(void *), void *ctx) noexcept
  {
    nbdkit_op *raw = take("reply_read_nocopy");
    if (raw == nullptr || count > UINT32_MAX) {
      if (release)
        release(ctx);
      return raw ? nbdkit_reply_error(raw, EIO) : -EINVAL;
    }
    return nbdkit_reply_read_nocopy(raw, data, static_cast<uint32_t>(count),
                                    release, ctx);
  }

  /* The same, keeping `owner` (whatever holds the bytes: a vector, a
   * network buffer) alive until the library is done with them. */
  template <class T>
  int reply_read_nocopy(const void *data, std::size_t count,
                        std::shared_ptr<T> owner) noexcept
  {
    auto *keep = new (std::nothrow) std::shared_ptr<T>(std::move(owner));
    if (keep == nullptr)
      return reply_read(data, count);   /* no memory to lend: copy */
    return reply_read_nocopy(
        data, count,
        [](void *p) { delete static_cast<std::shared_ptr<T> *>(p); }, keep);
  }

  /* Success of a block-status op: `n` extents following each other from
   * the op's offset (copied before it returns; the library trims them to
   * the request). */
  int reply_extents(const nbdkit_extent *extents, std::size_t n) noexcept
  {
    nbdkit_op *raw = take("reply_extents");
    return raw ? nbdkit_reply_extents(raw, extents, n) : -EINVAL;
  }
  template <class Container>
  int reply_extents(const Container &extents) noexcept
  {
    return reply_extents(std::data(extents), std::size(extents));
  }

  /* Success of a read whose buffer holds the data, with the extents
   * flagged NBDKIT_EXTENT_ZERO sent as holes (they must read as zeroes in
   * the buffer too). The extents cover exactly the read's count. */
  int reply_read_extents(const nbdkit_extent *extents, std::size_t n) noexcept
  {
    nbdkit_op *raw = take("reply_read_extents");
    return raw ? nbdkit_reply_read_extents(raw, extents, n) : -EINVAL;
  }
  template <class Container>
  int reply_read_extents(const Container &extents) noexcept
  {
    return reply_read_extents(std::data(extents), std::size(extents));
  }

  /* Failure with a host errno (EIO, ENOSPC, EPERM, ...). */
  int reply_error(int errnum) noexcept
  {
    nbdkit_op *raw = take("reply_error");
    return raw ? nbdkit_reply_error(raw, errnum > 0 ? errnum : EIO) : -EINVAL;
  }
  int reply_error(std::errc e) noexcept
  {
    return reply_error(static_cast<int>(e));
  }
  /* Also takes boost::system::error_code, which converts to std::error_code. */
  int reply_error(const std::error_code &ec) noexcept
  {
    return reply_error(to_errno(ec));
  }

  /* For the C API: gives up ownership without replying. */
  nbdkit_op *release() noexcept { return std::exchange(raw_, nullptr); }

private:
  nbdkit_op *take(const char *fn) noexcept
  {
    if (raw_ == nullptr)
      detail::log_error(fn, "the op was already answered or moved from");
    return std::exchange(raw_, nullptr);
  }

  void abandon() noexcept
  {
    if (raw_ == nullptr)
      return;
    nbdkit_reply_error(std::exchange(raw_, nullptr), EIO);
    if (std::uncaught_exceptions() > 0 && detail::io_scope.depth > 0)
      ++detail::io_scope.abandoned;   /* logged after the exception */
    else
      detail::log_error(std::uncaught_exceptions() > 0
                        ? "op abandoned by an exception; answered EIO"
                        : "op destroyed without a reply; answered EIO");
  }

  nbdkit_op *raw_ = nullptr;
};

/* What can_fua answers (see NBDKIT_FUA_* in the C header). */
enum class fua_mode : int {
  none = NBDKIT_FUA_NONE,          /* FUA not offered */
  emulate = NBDKIT_FUA_EMULATE,    /* the library flushes after the write */
  native = NBDKIT_FUA_NATIVE,      /* flags carry NBDKIT_FLAG_FUA for you */
};

namespace detail {

/* has_X<P>: does the plugin class define member X? */
#define NBDKIT_DETAIL_HAS(member)                                        \
  template <class P, class = void>                                      \
  struct has_##member : std::false_type {};                             \
  template <class P>                                                    \
  struct has_##member<P, std::void_t<decltype(&P::member)>>            \
    : std::true_type {};
NBDKIT_DETAIL_HAS(open)
NBDKIT_DETAIL_HAS(close)
NBDKIT_DETAIL_HAS(get_size)
NBDKIT_DETAIL_HAS(can_write)
NBDKIT_DETAIL_HAS(can_flush)
NBDKIT_DETAIL_HAS(can_trim)
NBDKIT_DETAIL_HAS(can_zero)
NBDKIT_DETAIL_HAS(can_fua)
NBDKIT_DETAIL_HAS(can_multi_conn)
NBDKIT_DETAIL_HAS(can_cache)
NBDKIT_DETAIL_HAS(pread)
NBDKIT_DETAIL_HAS(pwrite)
NBDKIT_DETAIL_HAS(flush)
NBDKIT_DETAIL_HAS(trim)
NBDKIT_DETAIL_HAS(zero)
NBDKIT_DETAIL_HAS(cache)
NBDKIT_DETAIL_HAS(extents)
NBDKIT_DETAIL_HAS(can_extents)
NBDKIT_DETAIL_HAS(cancel)
#undef NBDKIT_DETAIL_HAS

/* The C callbacks for plugin class P. The handle is always the plugin
 * object. Every trampoline is noexcept and catches everything: an
 * exception must never unwind into the Rust library.
 */
template <class P>
struct adaptor {
  static P &self(void *h) noexcept { return *static_cast<P *>(h); }

  static void *open(void *user_data, int readonly,
                    const char *export_name) noexcept
  {
    try {
      self(user_data).open(readonly != 0,
                           std::string_view(export_name ? export_name : ""));
      return user_data;
    }
    catch (...) {
      errno = log_current_exception("open");   /* refuses the client */
      return nullptr;
    }
  }

  static void close(void *h) noexcept
  {
    try {
      self(h).close();
    }
    catch (...) {
      log_current_exception("close");
    }
  }

  static int64_t get_size(void *h) noexcept
  {
    try {
      return static_cast<int64_t>(self(h).get_size());
    }
    catch (...) {
      log_current_exception("get_size");
      return -1;
    }
  }

  /* A capability: 1 or 0, -1 (client refused) on exception. */
  template <class F>
  static int capability(const char *name, F f) noexcept
  {
    try {
      return f() ? 1 : 0;
    }
    catch (...) {
      log_current_exception(name);
      return -1;
    }
  }
  static int can_write(void *h) noexcept
  { return capability("can_write", [h] { return self(h).can_write(); }); }
  static int can_flush(void *h) noexcept
  { return capability("can_flush", [h] { return self(h).can_flush(); }); }
  static int can_trim(void *h) noexcept
  { return capability("can_trim", [h] { return self(h).can_trim(); }); }
  static int can_zero(void *h) noexcept
  { return capability("can_zero", [h] { return self(h).can_zero(); }); }
  static int can_multi_conn(void *h) noexcept
  { return capability("can_multi_conn",
                       [h] { return self(h).can_multi_conn(); }); }
  static int can_cache(void *h) noexcept
  { return capability("can_cache", [h] { return self(h).can_cache(); }); }

  static int can_fua(void *h) noexcept
  {
    try {
      return static_cast<int>(fua_mode(self(h).can_fua()));
    }
    catch (...) {
      log_current_exception("can_fua");
      return -1;
    }
  }

  /* I/O: the op is constructed straight into the member's parameter. If
   * the member throws before handing it on, the op is destroyed during
   * unwinding and answers EIO; if it had handed it on, its new owner
   * answers. Either way the op is taken: return 0, never -1 (that would
   * be a second answer).
   */
  template <class F>
  static int io(const char *name, F f) noexcept
  {
    ++io_scope.depth;
    try {
      f();
    }
    catch (...) {
      log_current_exception(name);
    }
    --io_scope.depth;
    log_abandoned();
    return 0;
  }
  static int pread(nbdkit_op *o, void *h, void *buf, uint32_t count,
                   uint64_t offset, uint32_t flags) noexcept
  {
    return io("pread", [&] {
      self(h).pread(op(o), buf, count, offset, flags);
    });
  }
  static int pwrite(nbdkit_op *o, void *h, const void *buf, uint32_t count,
                    uint64_t offset, uint32_t flags) noexcept
  {
    return io("pwrite", [&] {
      self(h).pwrite(op(o), buf, count, offset, flags);
    });
  }
  static int flush(nbdkit_op *o, void *h, uint32_t flags) noexcept
  {
    return io("flush", [&] { self(h).flush(op(o), flags); });
  }
  static int trim(nbdkit_op *o, void *h, uint32_t count, uint64_t offset,
                  uint32_t flags) noexcept
  {
    return io("trim", [&] { self(h).trim(op(o), count, offset, flags); });
  }
  static int zero(nbdkit_op *o, void *h, uint32_t count, uint64_t offset,
                  uint32_t flags) noexcept
  {
    return io("zero", [&] { self(h).zero(op(o), count, offset, flags); });
  }
  static int cache(nbdkit_op *o, void *h, uint32_t count, uint64_t offset,
                   uint32_t flags) noexcept
  {
    return io("cache", [&] {
      self(h).cache(op(o), count, offset, flags);
    });
  }

  static int extents(nbdkit_op *o, void *h, uint32_t count, uint64_t offset,
                     uint32_t flags) noexcept
  {
    return io("extents", [&] {
      self(h).extents(op(o), count, offset, flags);
    });
  }

  static void cancel(nbdkit_op *o, void *h) noexcept
  {
    try {
      self(h).cancel(static_cast<op_id>(reinterpret_cast<std::uintptr_t>(o)));
    }
    catch (...) {
      log_current_exception("cancel");
    }
  }

  /* The C struct: a callback for each member P defines, NULL otherwise
   * (extents also NULL when can_extents() says no: it may throw). */
  static nbdkit_plugin_lowlevel callbacks(const char *name, P &plugin)
  {
    static_assert(has_get_size<P>::value,
                  "a plugin class needs int64_t get_size()");
    static_assert(has_pread<P>::value,
                  "a plugin class needs void pread(nbdkit::op, void *buf, "
                  "uint32_t count, uint64_t offset, uint32_t flags)");
    nbdkit_plugin_lowlevel c{};
    c.name = name;
    c.get_size = get_size;
    c.pread = pread;
    if constexpr (has_open<P>::value) c.open = open;
    if constexpr (has_close<P>::value) c.close = close;
    if constexpr (has_can_write<P>::value) c.can_write = can_write;
    if constexpr (has_can_flush<P>::value) c.can_flush = can_flush;
    if constexpr (has_can_trim<P>::value) c.can_trim = can_trim;
    if constexpr (has_can_zero<P>::value) c.can_zero = can_zero;
    if constexpr (has_can_fua<P>::value) c.can_fua = can_fua;
    if constexpr (has_can_multi_conn<P>::value)
      c.can_multi_conn = can_multi_conn;
    if constexpr (has_can_cache<P>::value) c.can_cache = can_cache;
    if constexpr (has_pwrite<P>::value) c.pwrite = pwrite;
    if constexpr (has_flush<P>::value) c.flush = flush;
    if constexpr (has_trim<P>::value) c.trim = trim;
    if constexpr (has_zero<P>::value) c.zero = zero;
    if constexpr (has_cache<P>::value) c.cache = cache;
    if constexpr (has_cancel<P>::value) c.cancel = cancel;
    if constexpr (has_extents<P>::value) {
      bool offer = true;
      if constexpr (has_can_extents<P>::value)
        offer = plugin.can_extents();
      if (offer)
        c.extents = extents;
    }
    else {
      static_assert(!has_can_extents<P>::value,
                    "can_extents() without extents()");
    }
    return c;
  }
};

inline void check(int r, const char *what)
{
  if (r < 0)
    throw std::system_error(-r, std::generic_category(), what);
}

} // namespace detail

/* An NBD server: owns an nbdkit_server for its whole life (RAII).
 *
 * Construct it with your plugin object (which must outlive it), configure
 * it, then call main_loop() on the thread that is to be the event loop.
 * Configuration errors throw std::system_error. All set-up calls belong
 * to the thread that created the server, before main_loop(); shutdown()
 * is the one call for other threads.
 *
 * Destroy it only after main_loop() has returned and after your own code
 * has stopped touching the ops it still held (join your thread pool
 * first): unanswered ops are released with the server.
 */
class server {
public:
  template <class Plugin>
  explicit server(Plugin &plugin, std::string name = "plugin")
    : name_(std::make_unique<std::string>(std::move(name)))
  {
    const nbdkit_plugin_lowlevel c =
      detail::adaptor<Plugin>::callbacks(name_->c_str(), plugin);
    srv_ = nbdkit_server_new(&c, sizeof c, &plugin);
    if (srv_ == nullptr)
      throw std::system_error(EINVAL, std::generic_category(),
                              "nbdkit_server_new");
  }
  server(server &&other) noexcept
    : name_(std::move(other.name_)),
      srv_(std::exchange(other.srv_, nullptr)) {}
  server &operator=(server &&) = delete;
  server(const server &) = delete;
  server &operator=(const server &) = delete;
  ~server() { nbdkit_server_free(srv_); }

  /* Listen on a Unix socket (removed again when the loop ends). */
  server &listen_unix(const std::string &path)
  {
    detail::check(nbdkit_server_listen_unix(srv_, path.c_str()),
                  "listen on Unix socket");
    return *this;
  }
  /* Listen on TCP; port 0 picks a free port. Returns the port. */
  uint16_t listen_tcp(const std::string &host, uint16_t port)
  {
    int r = nbdkit_server_listen_tcp(srv_, host.c_str(), port);
    detail::check(r, "listen on TCP");
    return static_cast<uint16_t>(r);
  }
  server &readonly(bool ro = true)
  {
    detail::check(nbdkit_server_set_readonly(srv_, ro), "set readonly");
    return *this;
  }
  server &export_name(const std::string &name)
  {
    detail::check(nbdkit_server_set_export_name(srv_, name.c_str()),
                  "set export name");
    return *this;
  }
  server &export_description(const std::string &text)
  {
    detail::check(nbdkit_server_set_export_description(srv_, text.c_str()),
                  "set export description");
    return *this;
  }
  /* TLS (see NBDKIT_TLS_*): a mode other than off needs certificates. */
  enum class tls_mode : int {
    off = NBDKIT_TLS_OFF,
    allow = NBDKIT_TLS_ALLOW,
    require = NBDKIT_TLS_REQUIRE,
  };
  server &tls(tls_mode mode)
  {
    detail::check(nbdkit_server_set_tls(srv_, static_cast<int>(mode)),
                  "set TLS mode");
    return *this;
  }
  /* DIR with ca-cert.pem, server-cert.pem, server-key.pem. */
  server &tls_certificates(const std::string &dir)
  {
    detail::check(nbdkit_server_set_tls_certificates(srv_, dir.c_str()),
                  "set TLS certificates");
    return *this;
  }
  server &tls_verify_peer(bool verify = true)
  {
    detail::check(nbdkit_server_set_tls_verify_peer(srv_, verify),
                  "set TLS peer verification");
    return *this;
  }
  server &max_inflight(uint32_t ops)
  {
    detail::check(nbdkit_server_set_max_inflight(srv_, ops),
                  "set max in-flight ops");
    return *this;
  }
  server &max_connections(uint32_t n)
  {
    detail::check(nbdkit_server_set_max_connections(srv_, n),
                  "set max connections");
    return *this;
  }
  server &memory_limits(std::size_t per_connection, std::size_t total)
  {
    detail::check(nbdkit_server_set_memory_limits(srv_, per_connection,
                                                  total),
                  "set memory limits");
    return *this;
  }
  server &handshake_timeout(std::chrono::milliseconds t)
  {
    detail::check(nbdkit_server_set_handshake_timeout_ms(srv_, ms32(t)),
                  "set handshake timeout");
    return *this;
  }
  server &request_timeout(std::chrono::milliseconds t)
  {
    detail::check(nbdkit_server_set_request_timeout_ms(srv_, ms32(t)),
                  "set request timeout");
    return *this;
  }
  /* How long shutdown waits for ops in flight before answering them
   * ESHUTDOWN itself; negative waits for every reply (the default).
   */
  server &shutdown_grace(std::chrono::milliseconds t)
  {
    detail::check(nbdkit_server_set_shutdown_grace_ms(srv_, t.count()),
                  "set shutdown grace");
    return *this;
  }

  /* Serves on the calling thread (which becomes the event-loop thread,
   * where every plugin member function runs) until shutdown() or
   * nbdkit::shutdown_all(); returns once every op in flight has been
   * answered and the replies sent. Call it once. Throws std::system_error
   * if the loop fails.
   */
  void main_loop()
  {
    detail::check(nbdkit_main_loop(srv_), "nbdkit_main_loop");
  }

  /* Asks main_loop() to drain and return. Any thread, any time, any
   * number of times; returns at once.
   */
  void shutdown() noexcept { nbdkit_server_shutdown(srv_); }

  nbdkit_server *native() const noexcept { return srv_; }

private:
  static uint32_t ms32(std::chrono::milliseconds t)
  {
    if (t.count() < 0 || t.count() > UINT32_MAX)
      throw std::system_error(EINVAL, std::generic_category(), "timeout");
    return static_cast<uint32_t>(t.count());
  }

  std::unique_ptr<std::string> name_;  /* stable address for the C struct */
  nbdkit_server *srv_ = nullptr;
};

/* Asks every server in the process to shut down. Async-signal-safe: the
 * one call a SIGINT/SIGTERM handler may make. Also fine from any thread.
 */
inline void shutdown_all() noexcept { nbdkit_shutdown(); }

} // namespace nbdkit

#endif /* NBDKIT_ASYNC_HPP */
