/* asio-gateway: an NBD-to-NBD gateway on boost::asio.
 *
 * It serves NBD downstream through libnbdkit-async and forwards every
 * request to an upstream NBD server over asio sockets, speaking the NBD
 * client side itself:
 *
 *   NBD clients ──► libnbdkit-async event loop ──post──► upstream strand
 *   (downstream)    (main thread: gateway::pread,        (pool threads:
 *                    pwrite, ... return at once)           async_write the
 *                                                          request, later
 *                  ◄── nbdkit::op::reply() ─────────────── async_read the
 *                      (from the asio completion handler)  reply, by cookie)
 *
 * Thousands of requests can be in flight on one pool thread (--threads,
 * default 1): a request is an entry in a map keyed by its NBD cookie,
 * never a thread or a blocking call. More threads help only when one is
 * busy all the time (TLS upstreams, many connections): below that, asio
 * hands work between idle threads, and those wake-ups cost more CPU per
 * request than everything else the gateway does (measured at 10 ms, QD
 * 256: 12.5 us per request with one thread, 20 with two). Each upstream connection is a small state machine on
 * its own strand, so its state needs no lock. The downstream op travels
 * with the request and is answered from the asio handler that sees the
 * upstream reply; read data is received straight into the buffer the
 * library handed to pread.
 *
 * When an upstream connection drops, its requests in flight fail with EIO
 * and it reconnects with backoff; while no upstream connection is up, new
 * requests fail at once instead of waiting.
 *
 * Block status: when the upstream agrees to the base:allocation meta
 * context, the gateway offers it downstream and forwards NBD_CMD_BLOCK_STATUS;
 * holes in upstream reads (NBD_REPLY_TYPE_OFFSET_HOLE) stay holes downstream.
 *
 * TLS: downstream with --tls=on|require --tls-certificates DIR (served by
 * the library); upstream with an nbds:// or nbds+unix:// URI, where the
 * gateway sends NBD_OPT_STARTTLS and shakes hands with boost::asio::ssl
 * (OpenSSL), verifying the server against DIR/ca-cert.pem of
 * --upstream-tls-certificates DIR (and presenting DIR/client-cert.pem and
 * client-key.pem if they exist).
 *
 *   build/asio-gateway [--unix PATH] [--tcp HOST:PORT] --upstream URI
 *                      [--threads N] [--upstream-connections N]
 *                      [--tls=off|on|require] [--tls-certificates DIR]
 *                      [--upstream-tls-certificates DIR]
 *
 * URI is nbd[s]+unix:///EXPORT?socket=PATH or nbd[s]://HOST[:PORT]/EXPORT.
 */
#include <getopt.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <functional>
#include <future>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

#include <nbdkit-async.hpp>

namespace asio = boost::asio;
using boost::system::error_code;
using namespace std::chrono_literals;

static void warn(const std::string &msg)
{
  std::string line = "asio-gateway: " + msg + "\n";
  std::fputs(line.c_str(), stderr);   /* one write: threads do not mix */
}

/* ---------------------------------------------------------------------
 * The NBD wire format, client side (see the NBD protocol, doc/proto.md).
 */
namespace wire {

constexpr uint64_t NBDMAGIC = 0x4e42444d41474943;    /* "NBDMAGIC" */
constexpr uint64_t IHAVEOPT = 0x49484156454f5054;    /* "IHAVEOPT" */
constexpr uint64_t OPT_REPLY_MAGIC = 0x3e889045565a9;
constexpr uint32_t REQUEST_MAGIC = 0x25609513;
constexpr uint32_t SIMPLE_REPLY_MAGIC = 0x67446698;
constexpr uint32_t STRUCTURED_REPLY_MAGIC = 0x668e33ef;

constexpr uint16_t FLAG_FIXED_NEWSTYLE = 1 << 0;     /* handshake flags */
constexpr uint16_t FLAG_NO_ZEROES = 1 << 1;

constexpr uint32_t OPT_STARTTLS = 5;
constexpr uint32_t OPT_GO = 7;
constexpr uint32_t OPT_STRUCTURED_REPLY = 8;
constexpr uint32_t OPT_SET_META_CONTEXT = 10;
constexpr uint32_t REP_ACK = 1;
constexpr uint32_t REP_INFO = 3;
constexpr uint32_t REP_META_CONTEXT = 4;
constexpr uint32_t REP_ERR_UNSUP = (1u << 31) + 1;
constexpr uint16_t INFO_EXPORT = 0;

constexpr uint16_t TF_READ_ONLY = 1 << 1;            /* transmission flags */
constexpr uint16_t TF_SEND_FLUSH = 1 << 2;
constexpr uint16_t TF_SEND_FUA = 1 << 3;
constexpr uint16_t TF_SEND_TRIM = 1 << 5;
constexpr uint16_t TF_SEND_WRITE_ZEROES = 1 << 6;
constexpr uint16_t TF_CAN_MULTI_CONN = 1 << 8;
constexpr uint16_t TF_SEND_CACHE = 1 << 10;

constexpr uint16_t CMD_READ = 0;
constexpr uint16_t CMD_WRITE = 1;
constexpr uint16_t CMD_DISC = 2;
constexpr uint16_t CMD_FLUSH = 3;
constexpr uint16_t CMD_TRIM = 4;
constexpr uint16_t CMD_CACHE = 5;
constexpr uint16_t CMD_WRITE_ZEROES = 6;
constexpr uint16_t CMD_BLOCK_STATUS = 7;
constexpr uint16_t CMD_FLAG_FUA = 1 << 0;
constexpr uint16_t CMD_FLAG_NO_HOLE = 1 << 1;
constexpr uint16_t CMD_FLAG_REQ_ONE = 1 << 3;

constexpr uint16_t REPLY_FLAG_DONE = 1 << 0;
constexpr uint16_t REPLY_TYPE_NONE = 0;
constexpr uint16_t REPLY_TYPE_OFFSET_DATA = 1;
constexpr uint16_t REPLY_TYPE_OFFSET_HOLE = 2;
constexpr uint16_t REPLY_TYPE_BLOCK_STATUS = 5;
constexpr uint16_t REPLY_TYPE_ERROR_BIT = 1 << 15;   /* all error chunks */

constexpr uint32_t NBD_EIO = 5;

constexpr const char *BASE_ALLOCATION = "base:allocation";
/* NBD_STATE_HOLE and NBD_STATE_ZERO are NBDKIT_EXTENT_HOLE and _ZERO. */
constexpr uint32_t STATE_MASK = NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO;
/* A block status chunk we accept: context id + up to 1M descriptors. */
constexpr uint32_t MAX_BLOCK_STATUS = 4 + 8 * (1u << 20);

/* NBD error values are a fixed set; the host's errno may differ. */
inline int to_errno(uint32_t nbd_error)
{
  switch (nbd_error) {
  case 1: return EPERM;
  case 12: return ENOMEM;
  case 22: return EINVAL;
  case 28: return ENOSPC;
  case 75: return EOVERFLOW;
  case 95: return ENOTSUP;
  /* ESHUTDOWN (108) means the upstream is going away, not us: our
   * client must not take it as a reason to disconnect. */
  default: return EIO;
  }
}

/* Big-endian fields: get from bytes, put to bytes (returning the end). */
inline uint16_t get16(const unsigned char *p)
{
  return static_cast<uint16_t>(p[0] << 8 | p[1]);
}
inline uint32_t get32(const unsigned char *p)
{
  return uint32_t(get16(p)) << 16 | get16(p + 2);
}
inline uint64_t get64(const unsigned char *p)
{
  return uint64_t(get32(p)) << 32 | get32(p + 4);
}
inline unsigned char *put(unsigned char *p, uint64_t v, int bytes)
{
  for (int i = bytes - 1; i >= 0; i--)
    *p++ = static_cast<unsigned char>(v >> (8 * i));
  return p;
}
inline void put(std::vector<unsigned char> &out, uint64_t v, int bytes)
{
  out.resize(out.size() + bytes);
  put(out.data() + out.size() - bytes, v, bytes);
}

} // namespace wire

/* ---------------------------------------------------------------------
 * Where the upstream is: parsed from an NBD URI.
 */
struct upstream_address {
  bool tls = false;               /* nbds: STARTTLS, required */
  std::string export_name;
  std::string socket_path;        /* nbd+unix:// */
  std::string host, port;         /* nbd:// */
};

static std::string percent_decode(const std::string &s)
{
  std::string out;
  for (std::size_t i = 0; i < s.size(); i++) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(s[i + 1]) &&
        std::isxdigit(s[i + 2])) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    }
    else
      out += s[i];
  }
  return out;
}

static upstream_address parse_uri(const std::string &uri)
{
  upstream_address a;
  std::string rest, query;
  bool is_unix = false, matched = false;
  for (const char *scheme : { "nbd://", "nbds://", "nbd+unix://",
                              "nbds+unix://" }) {
    std::string prefix(scheme);
    if (uri.rfind(prefix, 0) == 0) {
      rest = uri.substr(prefix.size());
      a.tls = prefix[3] == 's';
      is_unix = prefix.find("+unix") != std::string::npos;
      matched = true;
      break;
    }
  }
  if (!matched)
    throw std::invalid_argument("unsupported upstream URI (want nbd[s]:// or "
                                "nbd[s]+unix://): " + uri);
  if (auto q = rest.find('?'); q != std::string::npos) {
    query = rest.substr(q + 1);
    rest.resize(q);
  }
  auto slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  if (slash != std::string::npos)
    a.export_name = percent_decode(rest.substr(slash + 1));

  if (is_unix) {
    for (std::size_t pos = 0; pos <= query.size();) {
      auto end = std::min(query.find('&', pos), query.size());
      std::string kv = query.substr(pos, end - pos);
      if (kv.rfind("socket=", 0) == 0)
        a.socket_path = percent_decode(kv.substr(7));
      pos = end + 1;
    }
    if (!authority.empty() || a.socket_path.empty())
      throw std::invalid_argument("want nbd[s]+unix:///EXPORT?socket=PATH: " +
                                  uri);
    return a;
  }
  /* HOST, HOST:PORT, [IPV6] or [IPV6]:PORT */
  a.port = "10809";
  std::size_t colon = authority.rfind(':');
  if (!authority.empty() && authority[0] == '[') {
    auto end = authority.find(']');
    if (end == std::string::npos)
      throw std::invalid_argument("bad IPv6 address in " + uri);
    a.host = authority.substr(1, end - 1);
    if (end + 1 < authority.size() && authority[end + 1] == ':')
      a.port = authority.substr(end + 2);
  }
  else if (colon != std::string::npos) {
    a.host = authority.substr(0, colon);
    a.port = authority.substr(colon + 1);
  }
  else
    a.host = authority;
  if (a.host.empty())
    throw std::invalid_argument("no host in " + uri);
  return a;
}

/* ---------------------------------------------------------------------
 * One downstream op on its way upstream and back.
 */
struct request {
  nbdkit::op op;                   /* answered when the upstream replies */
  uint16_t cmd = 0;
  uint16_t flags = 0;              /* NBD command flags */
  uint64_t offset = 0;
  uint32_t count = 0;
  void *read_buf = nullptr;        /* READ: the library's buffer, ours
                                      until op is answered */
  const void *write_buf = nullptr; /* WRITE: the payload, likewise */

  /* Filled in by the upstream connection. */
  uint64_t cookie = 0;
  std::array<unsigned char, 28> header{};
  uint32_t error = 0;              /* from an error chunk */
  uint64_t received = 0;           /* READ bytes received so far */
  std::vector<std::pair<uint64_t, uint64_t>> holes; /* READ: (offset from
                                      the request's, length) */
  std::vector<nbdkit_extent> extents; /* BLOCK_STATUS: the answer */
};

struct export_info {
  uint64_t size = 0;
  uint16_t flags = 0;              /* transmission flags */
  bool block_status = false;       /* base:allocation agreed */
  bool operator==(const export_info &o) const
  {
    return size == o.size && flags == o.flags &&
           block_status == o.block_status;
  }
};

/* Upstream TLS: a context shared by the connections, and the name the
 * server's certificate must carry (and SNI, unless it is an address). */
struct upstream_tls {
  asio::ssl::context context{asio::ssl::context::tls_client};
  std::string hostname;
};

/* ---------------------------------------------------------------------
 * One upstream NBD connection.
 *
 * Everything below runs on the connection's strand (the socket's and the
 * timer's executor, so their completion handlers land there by default),
 * except submit() and stop(), which post to it, and ready().
 *
 * States: connecting (connect + handshake, under a deadline) → ready
 * (requests flow) → down (after any error: requests failed, reconnect
 * after a backoff) → connecting ... and stopped at the end.
 */
class upstream {
public:
  using endpoint = asio::generic::stream_protocol::endpoint;
  /* Told of every handshake (info), and of every failure to connect or
   * shake hands (error); not of losing a ready connection. */
  using status_fn = std::function<void(const export_info *info,
                                       const std::string &error)>;

  /* `tls` (null: plaintext) must outlive the connection. */
  upstream(asio::thread_pool &pool, int index,
           std::vector<endpoint> endpoints, std::string export_name,
           upstream_tls *tls, status_fn on_status)
    : strand_(asio::make_strand(pool)), socket_(strand_), timer_(strand_),
      index_(index), endpoints_(std::move(endpoints)),
      export_name_(std::move(export_name)), tls_config_(tls),
      on_status_(std::move(on_status))
  {
  }

  /* Any thread. */
  void start() { asio::post(strand_, [this] { connect(); }); }
  bool ready() const { return ready_.load(std::memory_order_relaxed); }

  /* Any thread (the event loop): hands a request to the strand. Requests
   * submitted while the strand has not yet taken the earlier ones travel
   * together: one post, one wake-up of a pool thread and one write for
   * all the requests of a loop turn, instead of one each.
   */
  void submit(std::unique_ptr<request> r)
  {
    bool first;
    {
      std::lock_guard<std::mutex> lock(submitted_mu_);
      first = submitted_.empty();
      submitted_.push_back(std::move(r));
    }
    if (first)
      asio::post(strand_, [this] { send_submitted(); });
  }

  /* Any thread: close for good. The caller then joins the pool. */
  void stop()
  {
    asio::post(strand_, [this] {
      if (state_ == state::ready && inflight_.empty() && !writing_)
        say_goodbye();
      stopped_ = true;
      timer_.cancel();
      fail("stopped", ESHUTDOWN);
    });
  }

private:
  enum class state { connecting, ready, down };

  /* -- connecting --------------------------------------------------- */

  void connect()
  {
    state_ = state::connecting;
    /* A fresh TLS session per connection; handlers of the old one keep it
     * alive until they have run (see tls_read). */
    tls_.reset();
    /* One deadline covers connect and handshake. */
    timer_.expires_after(10s);
    timer_.async_wait([this, epoch = epoch_](error_code ec) {
      if (!ec && epoch == epoch_)
        fail("connect and handshake timed out");
    });
    auto connected = [this, epoch = epoch_](error_code ec,
                                            const endpoint &ep) {
      if (epoch != epoch_)
        return;
      if (ec)
        return fail("connect: " + ec.message());
      if (ep.protocol().family() != AF_UNIX)
        socket_.set_option(asio::ip::tcp::no_delay(true), ec);
      handshake();
    };
    asio::async_connect(socket_, endpoints_, connected);
  }

  /* Fixed newstyle: the server's greeting, our flags, then options. */
  void handshake()
  {
    read(asio::buffer(in_, 18), [this] {
      if (wire::get64(in_) != wire::NBDMAGIC ||
          wire::get64(in_ + 8) != wire::IHAVEOPT)
        return fail("not an NBD server speaking newstyle negotiation");
      uint16_t hflags = wire::get16(in_ + 16);
      if (!(hflags & wire::FLAG_FIXED_NEWSTYLE))
        return fail("the server does not speak fixed newstyle");
      out_.clear();
      wire::put(out_, wire::FLAG_FIXED_NEWSTYLE |
                      (hflags & wire::FLAG_NO_ZEROES), 4);
      if (tls_config_ == nullptr)
        return write(asio::buffer(out_), [this] { negotiate(); });
      add_option(wire::OPT_STARTTLS, {});
      write(asio::buffer(out_), [this] { starttls(); });
    });
  }

  /* NBD_OPT_STARTTLS acked: the TLS handshake, then everything again. */
  void starttls()
  {
    read_option_reply(wire::OPT_STARTTLS, [this](uint32_t type) {
      if (type != wire::REP_ACK)
        return fail("the upstream refused NBD_OPT_STARTTLS");
      auto stream = std::make_shared<tls_stream>(socket_,
                                                 tls_config_->context);
      const std::string &host = tls_config_->hostname;
      error_code ec;
      asio::ip::make_address(host, ec);
      if (ec && !SSL_set_tlsext_host_name(stream->native_handle(),
                                          host.c_str()))
        return fail("cannot set the TLS server name");
      stream->set_verify_mode(asio::ssl::verify_peer);
      stream->set_verify_callback(asio::ssl::host_name_verification(host));
      stream->async_handshake(asio::ssl::stream_base::client,
                              [this, epoch = epoch_, stream](error_code ec) {
        if (epoch != epoch_)
          return;
        if (ec)
          return fail("TLS handshake with the upstream: " + ec.message());
        tls_ = stream;
        negotiate();
      });
    });
  }

  /* Structured replies, then (if agreed) base:allocation, then GO. */
  void negotiate()
  {
    out_.clear();
    add_option(wire::OPT_STRUCTURED_REPLY, {});
    structured_ = false;
    meta_ok_ = false;
    write(asio::buffer(out_), [this] {
      /* Acked or refused, both reply kinds are handled below; with
       * structured replies an upstream read error cannot force a hard
       * disconnect, and reads may come back in chunks (or holes). */
      read_option_reply(wire::OPT_STRUCTURED_REPLY, [this](uint32_t type) {
        structured_ = type == wire::REP_ACK;
        if (structured_)
          return set_meta_context();
        go();
      });
    });
  }

  /* NBD_OPT_SET_META_CONTEXT base:allocation: used only if the upstream
   * answers with a context id for it; refusal is no error. */
  void set_meta_context()
  {
    std::vector<unsigned char> data;
    wire::put(data, export_name_.size(), 4);
    data.insert(data.end(), export_name_.begin(), export_name_.end());
    wire::put(data, 1, 4);                  /* one query */
    std::string query = wire::BASE_ALLOCATION;
    wire::put(data, query.size(), 4);
    data.insert(data.end(), query.begin(), query.end());
    out_.clear();
    add_option(wire::OPT_SET_META_CONTEXT, data);
    write(asio::buffer(out_), [this] { read_meta_replies(); });
  }

  void read_meta_replies()
  {
    read_option_reply(wire::OPT_SET_META_CONTEXT, [this](uint32_t type) {
      if (type == wire::REP_META_CONTEXT) {
        if (payload_.size() > 4 &&
            std::string(payload_.begin() + 4, payload_.end()) ==
              wire::BASE_ALLOCATION) {
          meta_id_ = wire::get32(payload_.data());
          meta_ok_ = true;
        }
        return read_meta_replies();         /* ACK (or error) follows */
      }
      if (type != wire::REP_ACK)
        meta_ok_ = false;                   /* refused: no block status */
      go();
    });
  }

  /* NBD_OPT_GO: choose the export; NBD_INFO_EXPORT brings size and flags. */
  void go()
  {
    std::vector<unsigned char> data;
    wire::put(data, export_name_.size(), 4);
    data.insert(data.end(), export_name_.begin(), export_name_.end());
    wire::put(data, 0, 2);                  /* no extra info requests */
    out_.clear();
    add_option(wire::OPT_GO, data);
    got_info_ = false;
    write(asio::buffer(out_), [this] { read_go_replies(); });
  }

  void read_go_replies()
  {
    read_option_reply(wire::OPT_GO, [this](uint32_t type) {
      if (type == wire::REP_INFO) {
        if (payload_.size() >= 12 &&
            wire::get16(payload_.data()) == wire::INFO_EXPORT) {
          info_.size = wire::get64(&payload_[2]);
          info_.flags = wire::get16(&payload_[10]);
          got_info_ = true;
        }
        return read_go_replies();           /* more replies follow */
      }
      if (type == wire::REP_ACK && got_info_) {
        info_.block_status = meta_ok_;
        return now_ready();
      }
      std::string why = type == wire::REP_ERR_UNSUP
        ? "the server does not support NBD_OPT_GO"
        : "export \"" + export_name_ + "\" refused";
      if ((type & (1u << 31)) && !payload_.empty())
        why += ": " + std::string(payload_.begin(), payload_.end());
      fail(why);
    });
  }

  void add_option(uint32_t opt, const std::vector<unsigned char> &data)
  {
    wire::put(out_, wire::IHAVEOPT, 8);
    wire::put(out_, opt, 4);
    wire::put(out_, data.size(), 4);
    out_.insert(out_.end(), data.begin(), data.end());
  }

  /* Reads one option reply header and its payload (into payload_). */
  template <class Next>
  void read_option_reply(uint32_t opt, Next next)
  {
    read(asio::buffer(in_, 20), [this, opt, next]() mutable {
      uint32_t length = wire::get32(in_ + 16);
      if (wire::get64(in_) != wire::OPT_REPLY_MAGIC ||
          wire::get32(in_ + 8) != opt || length > 65536)
        return fail("bad option reply");
      uint32_t type = wire::get32(in_ + 12);
      payload_.resize(length);
      read(asio::buffer(payload_), [next, type]() mutable { next(type); });
    });
  }

  void now_ready()
  {
    timer_.cancel();                        /* the handshake deadline */
    if (first_info_ && !(*first_info_ == info_))
      warn(name() + ": the export's size or flags changed across a "
          "reconnect; clients keep what they were told");
    if (!first_info_)
      first_info_ = info_;
    if (recovering_)
      warn(name() + ": connected again");
    recovering_ = false;
    state_ = state::ready;
    backoff_ = initial_backoff;
    ready_ = true;
    on_status_(&info_, {});
    rpos_ = rend_ = 0;                      /* the handshake read exactly */
    read_reply();
  }

  /* -- transmission: requests out ----------------------------------- */

  void send_submitted()
  {
    {
      std::lock_guard<std::mutex> lock(submitted_mu_);
      std::swap(taken_, submitted_);
    }
    holding_writes_ = true;       /* one write for the whole batch */
    for (auto &r : taken_)
      send(std::move(r));
    taken_.clear();
    holding_writes_ = false;
    if (!writing_ && !queue_.empty())
      write_queue();
  }

  void send(std::unique_ptr<request> r)
  {
    if (state_ != state::ready) {
      r->op.reply_error(EIO);               /* went down meanwhile */
      return;
    }
    if (r->cmd == wire::CMD_BLOCK_STATUS && !meta_ok_) {
      r->op.reply_error(ENOTSUP);           /* lost across a reconnect */
      return;
    }
    r->cookie = next_cookie_++;
    unsigned char *p = r->header.data();
    p = wire::put(p, wire::REQUEST_MAGIC, 4);
    p = wire::put(p, r->flags, 2);
    p = wire::put(p, r->cmd, 2);
    p = wire::put(p, r->cookie, 8);
    p = wire::put(p, r->offset, 8);
    wire::put(p, r->count, 4);
    queue_.push_back(r.get());
    inflight_.emplace(r->cookie, std::move(r));
    if (!writing_ && !holding_writes_)
      write_queue();
  }

  /* One gathered write for every request queued meanwhile: under load a
   * single sendmsg carries many requests. Buffers point into the requests
   * (headers) and into the library's write buffers (payloads): a reply
   * may retire a request while this write is still going, but only once
   * the upstream has read all of it (an NBD server reads a request,
   * payload included, before answering), so asio is past those bytes.
   */
  void write_queue()
  {
    writing_ = true;
    buffers_.clear();
    for (request *r : queue_) {
      buffers_.push_back(asio::buffer(r->header));
      if (r->cmd == wire::CMD_WRITE)
        buffers_.push_back(asio::buffer(r->write_buf, r->count));
    }
    queue_.clear();
    write(buffers_, [this] {
      writing_ = false;
      if (!queue_.empty())
        write_queue();
    });
  }

  /* Best effort, never blocking: NBD_CMD_DISC if the socket takes it now. */
  void say_goodbye()
  {
    out_.clear();
    wire::put(out_, wire::REQUEST_MAGIC, 4);
    wire::put(out_, 0, 2);
    wire::put(out_, wire::CMD_DISC, 2);
    wire::put(out_, 0, 8);                  /* cookie */
    wire::put(out_, 0, 8);                  /* offset */
    wire::put(out_, 0, 4);                  /* length */
    error_code ec;
    socket_.non_blocking(true, ec);
    if (tls_)
      asio::write(*tls_, asio::buffer(out_), ec);
    else
      socket_.write_some(asio::buffer(out_), ec);
  }

  /* -- transmission: replies in ------------------------------------- */

  /* Both reply kinds start with 16 bytes: magic, then (error, cookie) for
   * a simple reply or (flags, type, cookie) for a structured chunk, whose
   * 4-byte length follows.
   */
  void read_reply()
  {
    take(in_, 16, [this] {
      uint32_t magic = wire::get32(in_);
      if (magic == wire::SIMPLE_REPLY_MAGIC)
        return simple_reply();
      if (magic == wire::STRUCTURED_REPLY_MAGIC)
        return take(in_ + 16, 4, [this] { chunk(); });
      fail("bad reply magic from upstream");
    });
  }

  void simple_reply()
  {
    request *r = find(wire::get64(in_ + 8));
    if (r == nullptr)
      return;
    r->error = wire::get32(in_ + 4);
    if (r->cmd == wire::CMD_READ && r->error == 0) {
      /* The data follows: straight into the library's buffer. */
      return take(r->read_buf, r->count, [this, r] {
        r->received = r->count;
        finish(r);
        read_reply();
      });
    }
    finish(r);
    read_reply();
  }

  void chunk()
  {
    uint16_t flags = wire::get16(in_ + 4);
    uint16_t type = wire::get16(in_ + 6);
    uint32_t length = wire::get32(in_ + 16);
    request *r = find(wire::get64(in_ + 8));
    if (r == nullptr)
      return;
    /* After this chunk's payload: retire the request on the last chunk,
     * then wait for the next reply. */
    auto next = [this, r, done = (flags & wire::REPLY_FLAG_DONE) != 0] {
      if (done)
        finish(r);
      read_reply();
    };
    bool is_read = r->cmd == wire::CMD_READ;

    if (type == wire::REPLY_TYPE_NONE && length == 0)
      return next();
    if (type == wire::REPLY_TYPE_OFFSET_DATA && is_read && length > 8) {
      return take(in_, 8, [this, r, length, next] {
        uint64_t n = length - 8;
        char *dst = place(r, wire::get64(in_), n);
        if (dst == nullptr)
          return;
        take(dst, n, next);                 /* into the library's buffer */
      });
    }
    if (type == wire::REPLY_TYPE_OFFSET_HOLE && is_read && length == 12) {
      return take(in_, 12, [this, r, next] {
        uint32_t n = wire::get32(in_ + 8);
        uint64_t offset = wire::get64(in_);
        char *dst = place(r, offset, n);
        if (dst == nullptr)
          return;
        std::memset(dst, 0, n);             /* the buffer reads as zeroes */
        if (n > 0)
          r->holes.emplace_back(offset - r->offset, n);
        next();
      });
    }
    if (type == wire::REPLY_TYPE_BLOCK_STATUS &&
        r->cmd == wire::CMD_BLOCK_STATUS && length >= 12 &&
        (length - 4) % 8 == 0 && length <= wire::MAX_BLOCK_STATUS) {
      payload_.resize(length);
      return take(payload_.data(), payload_.size(), [this, r, next] {
        if (wire::get32(payload_.data()) != meta_id_)
          return fail("block status for a context never agreed");
        r->extents.clear();
        for (std::size_t i = 4; i + 8 <= payload_.size(); i += 8)
          r->extents.push_back(nbdkit_extent{
            wire::get32(&payload_[i]),
            wire::get32(&payload_[i + 4]) & wire::STATE_MASK });
        next();
      });
    }
    if ((type & wire::REPLY_TYPE_ERROR_BIT) && length >= 6 && length <= 65536) {
      /* error (32), message length (16), message, maybe an offset */
      payload_.resize(length);
      return take(payload_.data(), payload_.size(), [this, r, next] {
        uint32_t error = wire::get32(payload_.data());
        r->error = error ? error : wire::NBD_EIO;
        next();
      });
    }
    fail("unexpected reply chunk type " + std::to_string(type));
  }

  /* Where a content chunk for [offset, offset + n) goes in r's buffer; the
   * upstream must stay inside the request (else: a protocol error).
   */
  char *place(request *r, uint64_t offset, uint64_t n)
  {
    if (offset < r->offset || n > r->count ||
        offset - r->offset > r->count - n) {
      fail("reply chunk outside its request");
      return nullptr;
    }
    r->received += n;
    return static_cast<char *>(r->read_buf) + (offset - r->offset);
  }

  request *find(uint64_t cookie)
  {
    auto it = inflight_.find(cookie);
    if (it == inflight_.end()) {
      fail("reply to a request never sent");
      return nullptr;
    }
    return it->second.get();
  }

  /* The upstream's answer becomes the downstream answer. */
  void finish(request *r)
  {
    auto it = inflight_.find(r->cookie);
    std::unique_ptr<request> done = std::move(it->second);
    inflight_.erase(it);
    if (done->error == 0 && done->cmd == wire::CMD_READ &&
        done->received != done->count)
      done->error = wire::NBD_EIO;          /* success without all the data */
    if (done->error == 0 && done->cmd == wire::CMD_BLOCK_STATUS &&
        done->extents.empty())
      done->error = wire::NBD_EIO;          /* success without extents */
    if (done->error)
      done->op.reply_error(wire::to_errno(done->error));
    else if (done->cmd == wire::CMD_BLOCK_STATUS)
      done->op.reply_extents(done->extents);
    else if (done->cmd == wire::CMD_READ && !done->holes.empty())
      done->op.reply_read_extents(read_extents(*done));
    else
      done->op.reply();
  }

  /* A read's data and holes as extents covering exactly its count. */
  static std::vector<nbdkit_extent> read_extents(request &r)
  {
    std::sort(r.holes.begin(), r.holes.end());
    std::vector<nbdkit_extent> out;
    uint64_t pos = 0;
    for (auto [offset, n] : r.holes) {
      if (offset + n <= pos)
        continue;                           /* overlaps what we have */
      if (offset > pos)
        out.push_back(nbdkit_extent{ offset - pos, 0 });
      else
        n -= pos - offset, offset = pos;
      out.push_back(nbdkit_extent{ n, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO });
      pos = offset + n;
    }
    if (pos < r.count)
      out.push_back(nbdkit_extent{ r.count - pos, 0 });
    return out;
  }

  /* -- errors and reconnection -------------------------------------- */

  /* The connection is lost: every request on it fails, and new requests
   * fail at once until a reconnect succeeds.
   *
   * Answering a READ op frees the buffer an async_read may be filling.
   * That is safe here: closing the socket cancels its pending operations
   * under the same per-socket lock asio's reactor holds while it performs
   * them, so once close() returns nothing writes into those buffers.
   */
  void fail(const std::string &why, int err = EIO)
  {
    if (state_ == state::down)
      return;
    bool was_ready = state_ == state::ready;
    /* One line when a connection is lost or an outage begins, not one
     * per reconnect attempt. */
    if (!stopped_ && was_ready)
      warn(name() + ": " + why + "; failing " +
           std::to_string(inflight_.size()) + " requests; reconnecting");
    else if (!stopped_ && !recovering_)
      warn(name() + ": " + why + "; retrying with backoff");
    recovering_ = !stopped_;
    state_ = state::down;
    ready_ = false;
    ++epoch_;                 /* handlers still pending are now stale */
    rpos_ = rend_ = 0;
    error_code ignored;
    socket_.close(ignored);
    writing_ = false;
    queue_.clear();
    for (auto &entry : inflight_)
      entry.second->op.reply_error(err);
    inflight_.clear();
    if (!was_ready)
      on_status_(nullptr, why);
    if (stopped_)
      return;
    timer_.expires_after(backoff_);
    backoff_ = std::min(backoff_ * 2, max_backoff);
    timer_.async_wait([this, epoch = epoch_](error_code ec) {
      if (!ec && epoch == epoch_ && !stopped_)
        connect();
    });
  }

  /* Every socket completion goes through here: it ignores completions of
   * a connection already torn down (the epoch moved on) and turns errors
   * into fail(); otherwise it calls `next`.
   */
  template <class Next>
  auto checked(Next next)
  {
    return [this, epoch = epoch_, next = std::move(next)](error_code ec,
                                                         std::size_t bytes) mutable {
      if (epoch != epoch_)
        return;
      if (ec == asio::error::eof)
        return fail("the upstream closed the connection");
      if (ec)
        return fail(ec.message());
      if constexpr (std::is_invocable_v<Next &, std::size_t>)
        next(bytes);
      else
        (void) bytes, next();
    };
  }
  /* Over TLS once it is up. A TLS handler holds the session it runs on:
   * after a reconnect the old session lives until its last (stale)
   * completion has run. */
  template <class Handler>
  auto keep_tls(Handler h)
  {
    return [keep = tls_, h = std::move(h)](error_code ec,
                                           std::size_t n) mutable {
      h(ec, n);
    };
  }
  /* Replies come in through a large buffer: under load one recv brings
   * many of them, where reading each header and then its data on its own
   * cost two recvs a reply. `take` copies n bytes to dst and then calls
   * next; what the buffer does not hold yet is read, straight into dst
   * when it is large (read data then lands in the library's buffer with
   * no copy of ours, as before).
   */
  template <class Next>
  void take(void *dst, std::size_t n, Next next)
  {
    std::size_t have = std::min(n, rend_ - rpos_);
    std::memcpy(dst, rbuf_.data() + rpos_, have);
    rpos_ += have;
    std::size_t rest = n - have;
    if (rest >= direct_read)
      return read(asio::buffer(static_cast<char *>(dst) + have, rest),
                  std::move(next));
    fill(rest, [this, dst, have, rest, next = std::move(next)]() mutable {
      std::memcpy(static_cast<char *>(dst) + have, rbuf_.data() + rpos_, rest);
      rpos_ += rest;
      next();
    });
  }

  /* Calls next once the buffer holds n bytes (n < direct_read). Replies
   * already buffered are handled in this same call, up to a depth, then
   * on a fresh stack through the strand. */
  template <class Next>
  void fill(std::size_t n, Next next)
  {
    if (rend_ - rpos_ >= n) {
      if (depth_ < max_depth) {
        ++depth_;
        next();
        --depth_;
        return;
      }
      asio::post(strand_, [this, epoch = epoch_, next = std::move(next)]() mutable {
        if (epoch == epoch_)
          next();
      });
      return;
    }
    std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
    rend_ -= rpos_;
    rpos_ = 0;
    auto space = asio::buffer(rbuf_.data() + rend_, rbuf_.size() - rend_);
    auto got = [this, n, next = std::move(next)](std::size_t bytes) mutable {
      rend_ += bytes;
      fill(n, std::move(next));
    };
    if (tls_)
      asio::async_read(*tls_, space, asio::transfer_at_least(n - (rend_ - rpos_)),
                       keep_tls(checked(std::move(got))));
    else
      asio::async_read(socket_, space, asio::transfer_at_least(n - (rend_ - rpos_)),
                       checked(std::move(got)));
  }

  template <class Buffers, class Next>
  void read(const Buffers &b, Next next)
  {
    if (tls_)
      asio::async_read(*tls_, b, keep_tls(checked(std::move(next))));
    else
      asio::async_read(socket_, b, checked(std::move(next)));
  }
  template <class Buffers, class Next>
  void write(const Buffers &b, Next next)
  {
    if (tls_)
      asio::async_write(*tls_, b, keep_tls(checked(std::move(next))));
    else
      asio::async_write(socket_, b, checked(std::move(next)));
  }

  std::string name() const { return "upstream #" + std::to_string(index_); }

  static constexpr std::chrono::milliseconds initial_backoff = 50ms;
  static constexpr std::chrono::milliseconds max_backoff = 1000ms;

  using tls_stream = asio::ssl::stream<asio::generic::stream_protocol::socket &>;

  asio::strand<asio::thread_pool::executor_type> strand_;
  asio::generic::stream_protocol::socket socket_;
  std::shared_ptr<tls_stream> tls_; /* set once TLS is up */
  asio::steady_timer timer_;       /* handshake deadline, then backoff */
  const int index_;
  const std::vector<endpoint> endpoints_;
  const std::string export_name_;
  upstream_tls *const tls_config_;
  const status_fn on_status_;

  state state_ = state::down;
  std::atomic<bool> ready_{false}; /* read by the event loop */
  bool stopped_ = false;
  bool recovering_ = false;        /* failed since last ready (logged) */
  unsigned epoch_ = 0;             /* bumped whenever the socket closes */
  std::chrono::milliseconds backoff_ = initial_backoff;

  bool got_info_ = false;
  bool structured_ = false;        /* structured replies agreed */
  bool meta_ok_ = false;           /* base:allocation agreed, as: */
  uint32_t meta_id_ = 0;
  export_info info_;
  std::optional<export_info> first_info_;

  unsigned char in_[20];           /* headers being read */
  static constexpr std::size_t direct_read = 64 * 1024;
  static constexpr int max_depth = 32;
  std::vector<unsigned char> rbuf_ = std::vector<unsigned char>(256 * 1024);
  std::size_t rpos_ = 0, rend_ = 0; /* replies buffered: [rpos_, rend_) */
  int depth_ = 0;                  /* replies handled within one call */
  std::vector<unsigned char> payload_;
  std::vector<unsigned char> out_; /* handshake bytes being written */

  uint64_t next_cookie_ = 1;
  std::unordered_map<uint64_t, std::unique_ptr<request>> inflight_;
  std::vector<request *> queue_;   /* in inflight_, not yet written */
  bool writing_ = false;
  bool holding_writes_ = false;    /* sending a batch: write at its end */

  /* Submitted by the event loop, not yet taken by the strand. */
  std::mutex submitted_mu_;
  std::vector<std::unique_ptr<request>> submitted_;
  std::vector<std::unique_ptr<request>> taken_;  /* the strand's, reused */
  std::vector<asio::const_buffer> buffers_;
};

/* ---------------------------------------------------------------------
 * The plugin: what the library calls, on its event-loop thread.
 */
class gateway {
public:
  /* `tls_certificates`: the directory for an nbds:// upstream. */
  gateway(const upstream_address &addr, unsigned threads, unsigned connections,
          const std::string &tls_certificates)
    : pool_(threads), addr_(addr), connections_(connections)
  {
    if (addr_.tls)
      tls_ = make_tls(tls_certificates);
  }

  /* Joins the pool: no thread touches an op or an upstream afterwards. */
  ~gateway() { stop(); }

  asio::thread_pool &pool() { return pool_; }

  /* Connects one upstream connection and waits for its handshake: its
   * export's size and flags decide what the gateway offers. Then opens
   * the other connections, if sharing the load between them is safe.
   * Main thread, before serving; throws if the upstream cannot be reached.
   */
  void start()
  {
    endpoints_ = resolve();
    add_upstream();
    info_ = startup_.get_future().get();
    if (connections_ > 1 && !(info_.flags & wire::TF_CAN_MULTI_CONN)) {
      warn("the upstream does not allow multi-conn: using one connection");
      connections_ = 1;
    }
    while (upstreams_.size() < connections_)
      add_upstream();
  }

  /* Main thread, once the server loop has returned (and any other work
   * on the pool, such as a signal_set, was cancelled). Idempotent.
   */
  void stop()
  {
    for (auto &u : upstreams_)
      u->stop();
    pool_.join();
  }

  /* What we offer is what the upstream offers. */
  int64_t get_size() const { return static_cast<int64_t>(info_.size); }
  bool can_write() const { return !(info_.flags & wire::TF_READ_ONLY); }
  bool can_flush() const { return info_.flags & wire::TF_SEND_FLUSH; }
  bool can_trim() const { return info_.flags & wire::TF_SEND_TRIM; }
  bool can_zero() const { return info_.flags & wire::TF_SEND_WRITE_ZEROES; }
  bool can_cache() const { return info_.flags & wire::TF_SEND_CACHE; }
  /* Asked once, by the server's constructor: block status is offered
   * downstream when the upstream agreed to base:allocation. */
  bool can_extents() const { return info_.block_status; }
  nbdkit::fua_mode can_fua() const
  {
    return info_.flags & wire::TF_SEND_FUA ? nbdkit::fua_mode::native
                                           : nbdkit::fua_mode::none;
  }
  /* Every client shares our upstream connections: a flush covers them
   * all if the upstream says so, or if there is just one.
   */
  bool can_multi_conn() const
  {
    return (info_.flags & wire::TF_CAN_MULTI_CONN) || upstreams_.size() == 1;
  }

  void pread(nbdkit::op op, void *buf, uint32_t count, uint64_t offset,
             uint32_t /*flags*/)
  {
    auto r = make(std::move(op), wire::CMD_READ, count, offset, 0);
    r->read_buf = buf;
    forward(std::move(r));
  }

  void pwrite(nbdkit::op op, const void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
  {
    auto r = make(std::move(op), wire::CMD_WRITE, count, offset, fua(flags));
    r->write_buf = buf;
    forward(std::move(r));
  }

  void zero(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t flags)
  {
    uint16_t f = fua(flags);
    if (!(flags & NBDKIT_FLAG_MAY_TRIM))
      f |= wire::CMD_FLAG_NO_HOLE;
    forward(make(std::move(op), wire::CMD_WRITE_ZEROES, count, offset, f));
  }

  void trim(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t flags)
  {
    forward(make(std::move(op), wire::CMD_TRIM, count, offset, fua(flags)));
  }

  void flush(nbdkit::op op, uint32_t /*flags*/)
  {
    forward(make(std::move(op), wire::CMD_FLUSH, 0, 0, 0));
  }

  void cache(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t /*flags*/)
  {
    forward(make(std::move(op), wire::CMD_CACHE, count, offset, 0));
  }

  void extents(nbdkit::op op, uint32_t count, uint64_t offset, uint32_t flags)
  {
    uint16_t f = flags & NBDKIT_FLAG_REQ_ONE ? wire::CMD_FLAG_REQ_ONE : 0;
    forward(make(std::move(op), wire::CMD_BLOCK_STATUS, count, offset, f));
  }

  /* No cancel(): NBD cannot take back a request already sent, and the
   * library keeps a cancelled op's buffer valid until we answer, so a
   * cancelled op simply finishes. A hung upstream cannot hold up shutdown
   * past the server's shutdown_grace (see main).
   */

private:
  static std::unique_ptr<request> make(nbdkit::op op, uint16_t cmd,
                                       uint32_t count, uint64_t offset,
                                       uint16_t flags)
  {
    auto r = std::make_unique<request>();
    r->op = std::move(op);
    r->cmd = cmd;
    r->count = count;
    r->offset = offset;
    r->flags = flags;
    return r;
  }

  static uint16_t fua(uint32_t flags)
  {
    return flags & NBDKIT_FLAG_FUA ? wire::CMD_FLAG_FUA : 0;
  }

  /* Round robin over the connections that are up. None up: fail now
   * rather than keep the client waiting; they reconnect on their own.
   */
  void forward(std::unique_ptr<request> r)
  {
    for (std::size_t i = 0; i < upstreams_.size(); i++) {
      upstream &u = *upstreams_[next_++ % upstreams_.size()];
      if (u.ready())
        return u.submit(std::move(r));
    }
    r->op.reply_error(EIO);
  }

  /* The client side of upstream TLS: verify the server against
   * DIR/ca-cert.pem; present DIR/client-cert.pem and client-key.pem if
   * both exist (for servers that verify clients). */
  std::unique_ptr<upstream_tls> make_tls(const std::string &dir)
  {
    if (dir.empty())
      throw std::invalid_argument("an nbds:// upstream needs "
                                  "--upstream-tls-certificates DIR");
    auto t = std::make_unique<upstream_tls>();
    t->context.set_options(asio::ssl::context::default_workarounds |
                           asio::ssl::context::no_sslv2 |
                           asio::ssl::context::no_sslv3 |
                           asio::ssl::context::no_tlsv1 |
                           asio::ssl::context::no_tlsv1_1);
    t->context.set_verify_mode(asio::ssl::verify_peer);
    t->context.load_verify_file(dir + "/ca-cert.pem");
    std::string cert = dir + "/client-cert.pem", key = dir + "/client-key.pem";
    if (access(cert.c_str(), R_OK) == 0 && access(key.c_str(), R_OK) == 0) {
      t->context.use_certificate_chain_file(cert);
      t->context.use_private_key_file(key, asio::ssl::context::pem);
    }
    t->hostname = addr_.socket_path.empty() ? addr_.host : "localhost";
    return t;
  }

  std::vector<upstream::endpoint> resolve()
  {
    if (!addr_.socket_path.empty())
      return { asio::local::stream_protocol::endpoint(addr_.socket_path) };
    /* Once, at start-up, before serving: the one blocking lookup. */
    asio::ip::tcp::resolver resolver(pool_);
    std::vector<upstream::endpoint> eps;
    for (const auto &e : resolver.resolve(addr_.host, addr_.port))
      eps.emplace_back(e.endpoint());
    return eps;
  }

  void add_upstream()
  {
    int index = static_cast<int>(upstreams_.size());
    auto on_status = [this](const export_info *info, const std::string &error) {
      /* Only the first handshake or failure decides start-up. */
      std::call_once(startup_once_, [&] {
        if (info)
          startup_.set_value(*info);
        else
          startup_.set_exception(std::make_exception_ptr(
            std::runtime_error("cannot use the upstream: " + error)));
      });
    };
    upstreams_.push_back(std::make_unique<upstream>(
      pool_, index, endpoints_, addr_.export_name, tls_.get(), on_status));
    upstreams_.back()->start();
  }

  asio::thread_pool pool_;         /* first: joined before the rest goes */
  upstream_address addr_;
  std::unique_ptr<upstream_tls> tls_; /* nbds:// only */
  std::size_t connections_;
  std::vector<upstream::endpoint> endpoints_;
  std::vector<std::unique_ptr<upstream>> upstreams_;
  std::once_flag startup_once_;
  std::promise<export_info> startup_;
  export_info info_;               /* fixed once serving starts */
  std::size_t next_ = 0;           /* round robin; event loop only */
};

/* ------------------------------------------------------------------- */

[[noreturn]] static void usage()
{
  std::cerr << "usage: asio-gateway [--unix PATH] [--tcp HOST:PORT]"
               " --upstream URI\n"
               "                    [--threads N] [--upstream-connections N]\n"
               "                    [--tls=off|on|require]"
               " [--tls-certificates DIR]\n"
               "                    [--upstream-tls-certificates DIR]\n"
               "URI: nbd[s]+unix:///EXPORT?socket=PATH"
               " or nbd[s]://HOST[:PORT]/EXPORT\n";
  std::exit(EXIT_FAILURE);
}

int main(int argc, char *argv[])
{
  std::string unix_path, tcp, upstream_uri, tls_certificates,
    upstream_tls_certificates;
  long threads = 1, connections = 2;
  auto tls = nbdkit::server::tls_mode::off;

  static const option opts[] = {
    { "unix", required_argument, nullptr, 'u' },
    { "tcp", required_argument, nullptr, 't' },
    { "upstream", required_argument, nullptr, 'U' },
    { "threads", required_argument, nullptr, 'T' },
    { "upstream-connections", required_argument, nullptr, 'c' },
    { "tls", required_argument, nullptr, 'S' },
    { "tls-certificates", required_argument, nullptr, 'C' },
    { "upstream-tls-certificates", required_argument, nullptr, 'A' },
    { nullptr, 0, nullptr, 0 },
  };
  for (int c; (c = getopt_long(argc, argv, "", opts, nullptr)) != -1;) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 'U': upstream_uri = optarg; break;
    case 'T': threads = std::atol(optarg); break;
    case 'c': connections = std::atol(optarg); break;
    case 'S':
      if (std::strcmp(optarg, "off") == 0)
        tls = nbdkit::server::tls_mode::off;
      else if (std::strcmp(optarg, "on") == 0)
        tls = nbdkit::server::tls_mode::allow;
      else if (std::strcmp(optarg, "require") == 0)
        tls = nbdkit::server::tls_mode::require;
      else
        usage();
      break;
    case 'C': tls_certificates = optarg; break;
    case 'A': upstream_tls_certificates = optarg; break;
    default: usage();
    }
  }
  if (optind != argc || upstream_uri.empty() || threads < 1 ||
      connections < 1 || connections > 64)
    usage();
  if (tls != nbdkit::server::tls_mode::off && tls_certificates.empty()) {
    warn("--tls=on|require needs --tls-certificates DIR");
    usage();
  }
  /* What we print: nbds when clients must use TLS. */
  const char *scheme =
    tls == nbdkit::server::tls_mode::require ? "nbds" : "nbd";
  if (unix_path.empty() && tcp.empty())
    tcp = "127.0.0.1:10809";

  try {
    gateway gw(parse_uri(upstream_uri), static_cast<unsigned>(threads),
               static_cast<unsigned>(connections), upstream_tls_certificates);
    gw.start();

    nbdkit::server srv(gw, "asio-gateway");
    srv.export_description("NBD gateway to " + upstream_uri);
    /* An upstream that stops answering must not stall our shutdown. */
    srv.shutdown_grace(5s);
    if (tls != nbdkit::server::tls_mode::off)
      srv.tls_certificates(tls_certificates).tls(tls);

    /* Before the URI is printed: whoever reads it may signal us at once. */
    asio::signal_set signals(gw.pool(), SIGINT, SIGTERM);
    signals.async_wait([&srv](error_code ec, int) {
      if (!ec)
        srv.shutdown();
    });

    if (!unix_path.empty()) {
      srv.listen_unix(unix_path);
      std::cout << scheme << "+unix:///?socket=" << unix_path << std::endl;
    }
    if (!tcp.empty()) {
      auto colon = tcp.rfind(':');
      if (colon == std::string::npos)
        usage();
      std::string host = tcp.substr(0, colon);
      auto port = srv.listen_tcp(host, static_cast<uint16_t>(
                                   std::atoi(tcp.c_str() + colon + 1)));
      std::cout << scheme << "://" << host << ":" << port << "/" << std::endl;
    }

    int rc = EXIT_SUCCESS;
    try {
      srv.main_loop();
    }
    catch (const std::exception &e) {
      warn(e.what());
      rc = EXIT_FAILURE;
    }
    /* Stop all asio work before srv goes: it frees ops we may hold. We
     * are exiting anyway: a second signal must not turn that into a kill.
     */
    signals.clear();
    std::signal(SIGINT, SIG_IGN);
    std::signal(SIGTERM, SIG_IGN);
    gw.stop();
    return rc;
  }
  catch (const std::exception &e) {
    warn(e.what());
    return EXIT_FAILURE;
  }
}
