/*
 * libnbdkit-async: an NBD server library with an asynchronous plugin API.
 *
 * Generated from the Rust sources by cbindgen (see build.rs): do not edit.
 *
 * Ownership and threading, in short: plugin callbacks run on the thread
 * that runs the loop (nbdkit_main_loop, or the host's thread calling
 * nbdkit_server_process) and must not block, with these exceptions: a
 * synchronous plugin's I/O callbacks run on library worker threads; a lent
 * read's `release` runs on whichever thread drops the reply (normally the
 * loop's); the log callback runs on any thread that logs; and `close` of a
 * connection whose ops the plugin still held runs in nbdkit_server_free, on
 * its caller's thread. Each op handed to an I/O callback is answered exactly
 * once with a reply function, from any thread. Set-up functions belong to
 * the thread that owns the server, before the loop starts; called from a
 * callback, they and the loop functions return -EBUSY rather than block.
 */

#ifndef NBDKIT_ASYNC_H
#define NBDKIT_ASYNC_H

#include <stddef.h>
#include <stdint.h>

/**
 * Log level: failures and plugin misuse (the callback's `level`, and a
 * maximum to pass to `nbdkit_set_log_callback`).
 */
#define NBDKIT_LOG_ERROR 1

/**
 * Log level: what an operator should look at (refused exports, request
 * timeouts, second replies). The default maximum.
 */
#define NBDKIT_LOG_WARN 2

/**
 * Log level: the server starting and stopping.
 */
#define NBDKIT_LOG_INFO 3

/**
 * Log level: each connection, option and command as it is handled
 * (NBD_OPT_GO, NBD_CMD_READ).
 */
#define NBDKIT_LOG_DEBUG 4

/**
 * Log level: everything, down to single steps of a request.
 */
#define NBDKIT_LOG_TRACE 5

/**
 * The write was requested with FUA: it must be on stable storage when
 * the op is replied to. Only passed when `can_fua` returns NBDKIT_FUA_NATIVE.
 */
#define NBDKIT_FLAG_FUA (1 << 1)

/**
 * `zero` may punch a hole instead of writing zeroes (the client did not
 * send NBD_CMD_FLAG_NO_HOLE).
 */
#define NBDKIT_FLAG_MAY_TRIM (1 << 0)

/**
 * `zero` must fail fast with ENOTSUP rather than write zeroes slowly
 * (the client sent NBD_CMD_FLAG_FAST_ZERO).
 */
#define NBDKIT_FLAG_FAST_ZERO (1 << 3)

/**
 * `extents`: the client wants just one extent (NBD_CMD_FLAG_REQ_ONE).
 */
#define NBDKIT_FLAG_REQ_ONE (1 << 2)

/**
 * `nbdkit_extent.type` bit: the range is not allocated.
 */
#define NBDKIT_EXTENT_HOLE (1 << 0)

/**
 * `nbdkit_extent.type` bit: the range reads as zeroes.
 */
#define NBDKIT_EXTENT_ZERO (1 << 1)

/**
 * `can_fua` result: FUA is not offered to clients.
 */
#define NBDKIT_FUA_NONE 0

/**
 * `can_fua` result: the library emulates FUA by calling `flush` after the
 * write completes and replying only once the flush completes.
 */
#define NBDKIT_FUA_EMULATE 1

/**
 * `can_fua` result: the plugin honours NBDKIT_FLAG_FUA itself.
 */
#define NBDKIT_FUA_NATIVE 2

/**
 * Only one client connection at a time; others wait before the handshake.
 * Implies NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS.
 */
#define NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS 0

/**
 * One I/O callback at a time in the whole server.
 */
#define NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS 1

/**
 * One I/O callback at a time per connection (handle); connections overlap.
 */
#define NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS 2

/**
 * Any number of I/O callbacks at once, on any handle.
 */
#define NBDKIT_THREAD_MODEL_PARALLEL 3

/**
 * No TLS: NBD_OPT_STARTTLS is refused (the default).
 */
#define NBDKIT_TLS_OFF 0

/**
 * Clients may start TLS, or stay in plaintext.
 */
#define NBDKIT_TLS_ALLOW 1

/**
 * Clients must start TLS first: every other option is answered
 * NBD_REP_ERR_TLS_REQD, and not even the export list is shown before.
 */
#define NBDKIT_TLS_REQUIRE 2

/**
 * The version of the headers a program was compiled with. Compare with
 * `nbdkit_async_version()` to see what it runs against.
 */
#define NBDKIT_ASYNC_VERSION_MAJOR 0

#define NBDKIT_ASYNC_VERSION_MINOR 1

#define NBDKIT_ASYNC_VERSION_MICRO 0

/**
 * The export list being built by a `list_exports` callback; add to it
 * with `nbdkit_add_export`. Valid only during that callback.
 */
typedef struct nbdkit_exports nbdkit_exports;

/**
 * The extents a synchronous `extents` callback is building; add to it
 * with `nbdkit_add_extent`. Valid only during that callback.
 */
typedef struct nbdkit_extents_builder nbdkit_extents_builder;

/**
 * An NBD request in flight, handed to an I/O callback.
 *
 * It is an opaque token, not a pointer to memory: never dereference it.
 * It stays valid until exactly one of `nbdkit_reply`, `nbdkit_reply_read`
 * or `nbdkit_reply_error` is called with it, from any thread, inside the
 * callback or later. A second reply, or a reply after the client went
 * away or the server ended, is detected and logged, and does no harm.
 */
typedef struct nbdkit_op nbdkit_op;

/**
 * An NBD server: a plugin, its listening sockets and settings.
 *
 * Create it with `nbdkit_server_new`, configure it, run it with
 * `nbdkit_main_loop`, then release it with `nbdkit_server_free`.
 * Set-up functions are for the thread that owns the server, before the
 * loop runs; `nbdkit_server_shutdown` is the one call meant for other
 * threads.
 */
typedef struct nbdkit_server nbdkit_server;

/**
 * A run of bytes with one allocation state, in a reply to `extents` or
 * a sparse read. Extents follow each other from the op's offset.
 *
 */
typedef struct nbdkit_extent {
  /**
   * Bytes in this run (runs of 0 bytes are skipped).
   */
  uint64_t length;
  /**
   * NBDKIT_EXTENT_HOLE and/or NBDKIT_EXTENT_ZERO, or 0 for data.
   */
  uint32_t type;
} nbdkit_extent;

/**
 * The callbacks of an asynchronous plugin (the low-level API).
 *
 * Pass it to `nbdkit_server_new` together with `sizeof` of the struct the
 * plugin was compiled against: fields are only ever appended, and fields
 * an older plugin does not know are treated as NULL.
 *
 * Every callback runs on the event-loop thread and must not block: an I/O
 * callback starts the work and returns at once. (`close` may also run in
 * `nbdkit_server_free`, on its caller's thread.)
 *
 * I/O callbacks (`pread`, `pwrite`, `flush`, `trim`, `zero`, `cache`,
 * `extents`) receive the op first and the plugin's per-connection handle
 * second. What they return is a separate channel from the reply:
 * - 0: the plugin took the op and answers it exactly once with one of the
 *   valid replies named below (inside the callback or later). Call the
 *   reply function and then `return 0`; do not return its result.
 * - -1: the op failed at once with `errno` (EIO if the callback left
 *   errno at 0). The library answers the client; the plugin must not
 *   reply to the op, nor touch its buffer after returning.
 * - any other negative value, -E: the op failed at once with errno E
 *   (`return -ENOSPC;`), as for -1. Values below -4095 mean EIO.
 * - a positive value is a plugin bug: it is logged as an error and the
 *   client is answered EIO, but the op is kept (its buffer stays valid)
 *   until the plugin replies to it, as the plugin may still do.
 *
 * A NULL I/O callback means the command is not offered to clients.
 *
 * Capability callbacks (`can_*`) return 1 (yes), 0 (no) or -1 (error:
 * the client cannot connect). A NULL capability callback answers from the
 * presence of the matching I/O callback.
 */
typedef struct nbdkit_plugin_lowlevel {
  /**
   * Short plugin name, used in logs. May be NULL.
   */
  const char *name;
  /**
   * Opens the export for one client connection and returns the plugin's
   * handle for it (any non-NULL pointer). Called once per connection, and
   * also briefly when a client asks about an export (NBD_OPT_INFO).
   * `readonly` is 1 when the server or connection is read-only.
   * `export_name` is the export the client chose, valid only during the
   * call. Return NULL with errno set to refuse the client, which is told
   * why in the option's error message and logged at warning level:
   * ENOENT gives NBD_REP_ERR_UNKNOWN (no such export); EPERM, EACCES or
   * EROFS give NBD_REP_ERR_POLICY; EINVAL NBD_REP_ERR_INVALID;
   * ESHUTDOWN NBD_REP_ERR_SHUTDOWN; anything else (EIO, ENOMEM, a
   * backend that is down; errno 0 counts as EIO) NBD_REP_ERR_PLATFORM.
   * If NULL, the handle is `user_data`.
   */
  void *(*open)(void *user_data, int readonly, const char *export_name);
  /**
   * Releases a handle from `open`. Called once every op of the connection
   * has been replied to, so no op ever outlives its handle. May be NULL.
   */
  void (*close)(void *handle);
  /**
   * Size of the export in bytes, or -1 on error. Required.
   */
  int64_t (*get_size)(void *handle);
  /**
   * Can clients write? Default: `pwrite` is not NULL.
   */
  int (*can_write)(void *handle);
  /**
   * Can clients flush? Default: `flush` is not NULL.
   */
  int (*can_flush)(void *handle);
  /**
   * Can clients trim? Default: `trim` is not NULL.
   */
  int (*can_trim)(void *handle);
  /**
   * Can clients write zeroes? Default: `zero` is not NULL.
   */
  int (*can_zero)(void *handle);
  /**
   * One of NBDKIT_FUA_NONE, NBDKIT_FUA_EMULATE, NBDKIT_FUA_NATIVE, or -1.
   * Default: NBDKIT_FUA_EMULATE when the export can flush, else NONE.
   */
  int (*can_fua)(void *handle);
  /**
   * Do all connections see the same data, so that a flush on one covers
   * writes completed on another? Default: no.
   */
  int (*can_multi_conn)(void *handle);
  /**
   * Can clients ask to prefetch? Default: `cache` is not NULL.
   */
  int (*can_cache)(void *handle);
  /**
   * Reads `count` bytes at `offset` into `buf`. `buf` is owned by the
   * library and stays valid until the op is replied to. Its contents on
   * entry are unspecified (buffers are reused): a reply that sends it
   * must have filled all `count` bytes.
   * Valid replies: `nbdkit_reply` or `nbdkit_reply_read_extents` (once
   * `buf` is filled), `nbdkit_reply_read` (a copy from elsewhere),
   * `nbdkit_reply_read_nocopy` (lent from elsewhere; `buf` goes unused),
   * `nbdkit_reply_error`.
   */
  int (*pread)(struct nbdkit_op *op,
               void *handle,
               void *buf,
               uint32_t count,
               uint64_t offset,
               uint32_t flags);
  /**
   * Writes `count` bytes from `buf` at `offset`. `buf` stays valid until
   * the op is replied to. `flags` may hold NBDKIT_FLAG_FUA.
   * Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
   */
  int (*pwrite)(struct nbdkit_op *op,
                void *handle,
                const void *buf,
                uint32_t count,
                uint64_t offset,
                uint32_t flags);
  /**
   * Makes every write completed so far durable.
   * Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
   */
  int (*flush)(struct nbdkit_op *op, void *handle, uint32_t flags);
  /**
   * Discards a range; it may read back as anything afterwards.
   * `flags` may hold NBDKIT_FLAG_FUA.
   * Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
   */
  int (*trim)(struct nbdkit_op *op, void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Writes zeroes to a range. `flags` may hold NBDKIT_FLAG_MAY_TRIM and
   * NBDKIT_FLAG_FUA.
   * Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
   */
  int (*zero)(struct nbdkit_op *op, void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Prefetches a range (NBD_CMD_CACHE).
   * Valid replies: `nbdkit_reply`, `nbdkit_reply_error`.
   */
  int (*cache)(struct nbdkit_op *op, void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Tells the plugin that nobody wants `op` any more: its client
   * disconnected, the server is shutting down, or the request timeout
   * passed (the client was then answered ETIMEDOUT already). Called at
   * most once per op, on the event-loop thread, for an op the loop has
   * not yet seen a reply to: a reply the plugin sent from another thread
   * just before may cross it, so an op may be cancelled after the
   * plugin answered it (ignore such a cancel). A gateway can abort the
   * upstream request. An op not yet answered must still be replied to
   * exactly once (any reply will do; ECANCELED is customary); its buffer
   * stays valid until then. May be NULL.
   */
  void (*cancel)(struct nbdkit_op *op, void *handle);
  /**
   * Reports allocation in `count` bytes at `offset` (NBD_CMD_BLOCK_STATUS
   * with the base:allocation context). `flags` may hold NBDKIT_FLAG_REQ_ONE.
   * If NULL, clients are not offered base:allocation.
   * Valid replies: `nbdkit_reply_extents`, `nbdkit_reply_error`.
   */
  int (*extents)(struct nbdkit_op *op, void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Can `zero` honour NBDKIT_FLAG_FAST_ZERO (fail at once with ENOTSUP
   * when zeroing would be slow)? Default: no, and the flag is not offered.
   */
  int (*can_fast_zero)(void *handle);
  /**
   * Block size constraints: minimum (a power of 2, at most 64 KiB),
   * preferred (a power of 2) and maximum (a multiple of the minimum; the
   * library lowers it to the server's maximum request size, 64 MiB by
   * default). Return 0 or -1. Requests breaking them are refused with
   * EINVAL before the plugin sees them. Default 1 / 4096 / the server's
   * maximum request size.
   */
  int (*block_size)(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum);
  /**
   * Lists the exports for NBD_OPT_LIST with `nbdkit_add_export`. Return
   * 0 or -1. When set, every export name a client asks for is passed to
   * `open` (which refuses unknown ones with ENOENT); "" still means the
   * name set with `nbdkit_server_set_export_name`. When NULL, the server
   * has the one export of that name.
   */
  int (*list_exports)(void *user_data, struct nbdkit_exports *exports);
  /**
   * The description of the open export (NBD_INFO_DESCRIPTION), or NULL.
   * The string must stay valid until the handle is closed. Default: the
   * server's description.
   */
  const char *(*export_description)(void *handle);
} nbdkit_plugin_lowlevel;

/**
 * The callbacks of a synchronous plugin (the classic nbdkit shape).
 *
 * Pass it to `nbdkit_server_new_sync` with `sizeof` of the struct, like
 * `nbdkit_plugin_lowlevel`; everything else about the server is the same.
 *
 * `open`, `close`, `get_size` and the `can_*` callbacks have the same
 * meaning as in `nbdkit_plugin_lowlevel` and run on the event-loop thread:
 * keep them quick. The I/O callbacks run on the library's worker threads
 * (see `nbdkit_server_set_threads`), as many at once as `thread_model`
 * allows. They block as long as they need, and return 0, or -1 with an
 * error set by `nbdkit_set_error` or left in `errno` (EIO if neither).
 * Buffers are valid only during the call. A NULL I/O callback means the
 * command is not offered to clients.
 */
typedef struct nbdkit_plugin {
  /**
   * Short plugin name, used in logs. May be NULL.
   */
  const char *name;
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  void *(*open)(void *user_data, int readonly, const char *export_name);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  void (*close)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`. Required.
   */
  int64_t (*get_size)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_write)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_flush)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_trim)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_zero)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_fua)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_multi_conn)(void *handle);
  /**
   * As in `nbdkit_plugin_lowlevel`.
   */
  int (*can_cache)(void *handle);
  /**
   * Reads `count` bytes at `offset` into `buf` (whose contents on entry
   * are unspecified: fill all of it). Required.
   */
  int (*pread)(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Writes `count` bytes from `buf` at `offset`; `flags` may hold NBDKIT_FLAG_FUA.
   */
  int (*pwrite)(void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Makes every completed write durable.
   */
  int (*flush)(void *handle, uint32_t flags);
  /**
   * Discards a range; `flags` may hold NBDKIT_FLAG_FUA.
   */
  int (*trim)(void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Writes zeroes; `flags` may hold NBDKIT_FLAG_MAY_TRIM and NBDKIT_FLAG_FUA.
   */
  int (*zero)(void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * Prefetches a range.
   */
  int (*cache)(void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  /**
   * One of NBDKIT_THREAD_MODEL_*; the library enforces it. 0 (zero
   * initialisation) is the safest, SERIALIZE_CONNECTIONS.
   */
  int thread_model;
  /**
   * Reports allocation in `count` bytes at `offset` (NBD_CMD_BLOCK_STATUS,
   * base:allocation) by calling `nbdkit_add_extent` for consecutive
   * ranges from `offset` on; it may stop early (the client asks again)
   * and may describe more than asked. `flags` may hold
   * NBDKIT_FLAG_REQ_ONE (one extent is enough). Runs on a worker thread
   * like the other I/O callbacks; returns 0, or -1 with an error as they
   * do. If NULL, clients are not offered base:allocation.
   */
  int (*extents)(void *handle,
                 uint32_t count,
                 uint64_t offset,
                 uint32_t flags,
                 struct nbdkit_extents_builder *extents);
  /**
   * As in `nbdkit_plugin_lowlevel`: lists the exports (NBD_OPT_LIST)
   * with `nbdkit_add_export`, on the event-loop thread.
   */
  int (*list_exports)(void *user_data, struct nbdkit_exports *exports);
} nbdkit_plugin;

/**
 * A snapshot of a server's counters. New fields are only appended; pass
 * `sizeof` of the struct you compiled against to `nbdkit_server_stats`.
 */
typedef struct nbdkit_stats {
  /**
   * Client connections open now.
   */
  uint64_t connections;
  /**
   * Client connections accepted since the server started.
   */
  uint64_t connections_total;
  /**
   * Requests handed to the plugin and not yet released by it.
   */
  uint64_t requests_in_flight;
  /**
   * Requests received, by NBD command number (NBD_CMD_READ = 0,
   * WRITE = 1, DISC = 2, FLUSH = 3, TRIM = 4, CACHE = 5,
   * WRITE_ZEROES = 6, BLOCK_STATUS = 7), refused ones included.
   */
  uint64_t requests[8];
  /**
   * Data bytes sent to clients by successful reads.
   */
  uint64_t bytes_read;
  /**
   * Data bytes received from clients in writes handed to the plugin.
   */
  uint64_t bytes_written;
  /**
   * Requests answered with an error (refused, failed or timed out).
   */
  uint64_t errors;
  /**
   * Reply latency: entry i counts replies that took 2^i to 2^(i+1)
   * microseconds from request to reply.
   */
  uint64_t latency_us_log2[32];
} nbdkit_stats;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * A descriptor that becomes readable whenever the server has work; watch
 * it in the host's loop (epoll, poll, asio `posix::stream_descriptor`) and
 * call `nbdkit_server_process` when it is. It stays valid until
 * `nbdkit_server_free`; do not read from it or close it.
 *
 * Callable from the thread that owns the server, callbacks included.
 * Returns the descriptor, or a negative errno: -EINVAL for a NULL server,
 * -EBUSY while `nbdkit_main_loop` runs the server.
 */
int nbdkit_server_fd(struct nbdkit_server *srv);

/**
 * Does whatever work is ready (accepting, reading, replying, timers)
 * without blocking, and returns. The first call starts the server.
 * Plugin callbacks run inside this call, on the calling thread, which
 * must be the same every time.
 *
 * Returns 1 while the server runs, 0 once a requested shutdown has
 * completed (stop watching the descriptor; free the server when your
 * threads are done with its ops), or a negative errno: -EBUSY at once
 * when called from inside one of the server's callbacks, from a second
 * thread while a call runs, or while `nbdkit_main_loop` runs the server;
 * -EIO after an internal error (logged; the server's memory is then kept
 * so that buffers the plugin holds stay valid); others when the server
 * cannot start.
 */
int nbdkit_server_process(struct nbdkit_server *srv);

/**
 * Milliseconds until `nbdkit_server_process` must be called even if the
 * descriptor stays quiet (a timer is due), to pass to poll(2) or the
 * like. Ask again after every `nbdkit_server_process`. Callable from the
 * thread that owns the server.
 *
 * Returns 0 or more: that many milliseconds; -1: no deadline, only
 * readiness of the descriptor matters (also once the server has
 * stopped); any other negative value is an error: -EINVAL for a NULL
 * server, -EBUSY from inside a callback or while `nbdkit_main_loop` runs
 * the server, -EIO after an internal error.
 */
int nbdkit_server_timeout_ms(struct nbdkit_server *srv);

/**
 * Sends the library's log messages to `callback` instead of stderr, for
 * messages up to `max_level` (NBDKIT_LOG_*; 0 silences everything).
 * NULL restores stderr. Process-wide; call it before creating servers.
 *
 * The callback may be called from any thread (the loop thread, worker
 * threads, threads calling reply functions), concurrently; `message` is
 * valid only during the call. Lines about one client start with
 * `conn N: `. The callback must not call `nbdkit_set_log_callback` (that
 * call is ignored, with a line on stderr); lines it logs with
 * `nbdkit_log` go to stderr.
 */
void nbdkit_set_log_callback(void (*callback)(void *user_data, int level, const char *message),
                             void *user_data,
                             int max_level);

/**
 * Logs `message` at `level` (NBDKIT_LOG_*) through the library's log:
 * the callback set with `nbdkit_set_log_callback`, or stderr. For plugins
 * and wrappers whose lines belong beside the library's. The string is
 * copied. Thread-safe: call from any thread, callbacks included.
 *
 * Returns 0 (also when the level filters the line out), or -EINVAL for
 * a NULL message or a level outside 1-5.
 *
 * # Safety
 * `message` must be NULL or a NUL-terminated string.
 */
int nbdkit_log(int level, const char *message);

/**
 * Adds an export to the list a `list_exports` callback is building.
 * `name` must be at most 4096 bytes of UTF-8; `description` may be NULL.
 * Both are copied. Call only from inside `list_exports`, on its thread.
 *
 * Returns 0, or -EINVAL (bad arguments) or -E2BIG (more than 10000 exports).
 *
 * # Safety
 * `exports` must be the pointer `list_exports` received; the strings must
 * be NUL-terminated.
 */
int nbdkit_add_export(struct nbdkit_exports *exports, const char *name, const char *description);

/**
 * Answers an op with success. For a read, the buffer given to `pread`
 * must hold the data by now.
 *
 * Thread-safe: call from any thread, inside the I/O callback or later,
 * exactly once per op. It queues the reply for the event loop and returns
 * without waiting for the socket. After it returns the op handle and any
 * buffer the callback received are no longer the plugin's to touch.
 *
 * Returns 0 once the reply is queued, or a negative errno when it could
 * not be: -EINVAL for NULL, -ESTALE when the op's server was freed,
 * -ESHUTDOWN when its loop has stopped. A second reply to an op, or one
 * with a made-up handle of a live server, is queued (0), then found out
 * by the loop, logged, and ignored.
 */
int nbdkit_reply(struct nbdkit_op *op);

/**
 * Answers a read op with `count` bytes from `data`, which are copied
 * before the call returns (so `data` stays the caller's). `count` must
 * equal the count given to `pread`; otherwise the client gets EIO.
 * Plugins that filled the buffer given to `pread` call `nbdkit_reply`
 * instead and save the copy.
 *
 * Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
 * negative errno as `nbdkit_reply` does.
 *
 * # Safety
 * `data` must point to `count` readable bytes.
 */
int nbdkit_reply_read(struct nbdkit_op *op, const void *data, uint32_t count);

/**
 * Answers a read op with `count` bytes at `data`, sent from there without
 * a copy: the zero-copy twin of `nbdkit_reply_read`, for data the plugin
 * already holds (a cache page, a network buffer, a memory-mapped file).
 * `count` must equal the count given to `pread`; otherwise the client
 * gets EIO.
 *
 * The bytes are lent, not given: they must stay readable until the
 * library calls `release(release_ctx)`; a change made to them before that
 * may reach the client. The library calls it exactly once, whatever
 * becomes of the reply: once the bytes are written to the connection (the
 * socket, or TLS records), or when the reply is dropped (client gone, op
 * already answered, misuse, server stopped or freed). That may happen
 * before this function returns, whatever it returns, so do not hold a
 * lock here that `release` takes. `release` may run on any thread
 * (normally the event loop's), must not block, and may be NULL when there
 * is nothing to give back. The buffer given to `pread` is then left unused.
 *
 * Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
 * negative errno as `nbdkit_reply` does.
 *
 * # Safety
 * `data` must point to `count` readable bytes until `release` is called.
 */
int nbdkit_reply_read_nocopy(struct nbdkit_op *op,
                             const void *data,
                             uint32_t count,
                             void (*release)(void *ctx),
                             void *release_ctx);

/**
 * Answers an op with an error. `errnum` is a host errno (EIO, ENOSPC,
 * EROFS, ...); the client sees the nearest NBD error. 0 is taken as EIO.
 *
 * Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
 * negative errno as `nbdkit_reply` does.
 */
int nbdkit_reply_error(struct nbdkit_op *op, int errnum);

/**
 * Answers a block-status op (`extents` callback) with `n` extents that
 * follow each other from the op's offset. They are copied before the call
 * returns. The library trims them to the requested range (one extent for
 * NBDKIT_FLAG_REQ_ONE) and skips empty ones; none left covering the
 * offset answers EIO. At most 65536 are sent; the client asks again for
 * the rest.
 *
 * Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
 * negative errno as `nbdkit_reply` does.
 *
 * # Safety
 * `extents` must point to `n` readable `nbdkit_extent`s.
 */
int nbdkit_reply_extents(struct nbdkit_op *op, const struct nbdkit_extent *extents, size_t n);

/**
 * Answers a read op whose buffer holds the data, saying which parts are
 * holes: extents with NBDKIT_EXTENT_ZERO are sent to the client as holes
 * (no data on the wire) when structured replies are on; otherwise, or
 * when the client asked for one chunk (DF), the library zeroes them in
 * the buffer and sends it whole. The extents must cover exactly the
 * read's count. They are copied before the call returns.
 *
 * Thread-safe, exactly once per op, like `nbdkit_reply`. Returns 0, or a
 * negative errno as `nbdkit_reply` does.
 *
 * # Safety
 * `extents` must point to `n` readable `nbdkit_extent`s.
 */
int nbdkit_reply_read_extents(struct nbdkit_op *op, const struct nbdkit_extent *extents, size_t n);

/**
 * Creates a server for `plugin`.
 *
 * `plugin_size` is `sizeof(struct nbdkit_plugin_lowlevel)` as the plugin
 * was compiled: callbacks the plugin's header did not have are NULL.
 * The struct is copied; `user_data` is passed to `open` and never touched
 * by the library.
 *
 * Returns NULL on error, logged and with `errno` set: EINVAL for a NULL
 * plugin or one missing `get_size` or `pread`; ENOTSUP for a plugin built
 * against a newer header with callbacks this library lacks; EMFILE,
 * ENOMEM and the like when the loop's descriptors cannot be made.
 * Callable from any thread; that thread then owns the server's set-up.
 * Free with `nbdkit_server_free`.
 *
 * # Safety
 * `plugin` must point to `plugin_size` readable bytes; its `name` and
 * callbacks must stay valid until the server is freed.
 */
struct nbdkit_server *nbdkit_server_new(const struct nbdkit_plugin_lowlevel *plugin,
                                        size_t plugin_size,
                                        void *user_data);

/**
 * Creates a server for a synchronous plugin: the same server as
 * `nbdkit_server_new` (every other function applies unchanged), with the
 * plugin's I/O callbacks run on library-owned worker threads as its
 * `thread_model` allows.
 *
 * `plugin_size` is `sizeof(struct nbdkit_plugin)` as the plugin was
 * compiled. Callable from any thread; that thread then owns the
 * server's set-up. Free with `nbdkit_server_free`.
 *
 * Returns NULL on error, logged and with `errno` set as for
 * `nbdkit_server_new` (EINVAL also for an unknown thread model).
 *
 * # Safety
 * As for `nbdkit_server_new`.
 */
struct nbdkit_server *nbdkit_server_new_sync(const struct nbdkit_plugin *plugin,
                                             size_t plugin_size,
                                             void *user_data);

/**
 * Releases a server. NULL is ignored. Ops of this server replied to
 * afterwards are ignored (the reply returns -ESTALE). Call it once, from
 * the thread that owns the server, after `nbdkit_main_loop` returned (or
 * `nbdkit_server_process` returned 0 or was never called). Called while
 * the loop runs (from a callback, or from another thread during
 * `nbdkit_main_loop`) it logs an error and frees nothing.
 */
void nbdkit_server_free(struct nbdkit_server *srv);

/**
 * Listens on a Unix socket at `path`. A stale socket file there (one no
 * server answers on) is replaced; a socket a live server answers on gives
 * -EADDRINUSE, and so does any other file. The path is removed when the
 * loop ends. Set-up thread only, before `nbdkit_main_loop`.
 *
 * Returns 0 or a negative errno.
 *
 * # Safety
 * `path` must be a NUL-terminated string.
 */
int nbdkit_server_listen_unix(struct nbdkit_server *srv, const char *path);

/**
 * Listens on TCP `host`:`port` (IPv4 or IPv6; a name listens on every
 * address it resolves to; NULL means all IPv4 addresses). `port` 0 picks
 * a free port. Set-up thread only, before `nbdkit_main_loop`.
 *
 * Returns the port listened on (> 0), or a negative errno.
 *
 * # Safety
 * `host` must be NULL or a NUL-terminated string.
 */
int nbdkit_server_listen_tcp(struct nbdkit_server *srv, const char *host, uint16_t port);

/**
 * Listens on the sockets systemd passed when socket-activating this
 * process (LISTEN_PID / LISTEN_FDS, from fd 3), Unix or TCP. The sockets
 * are taken once per process: the call clears LISTEN_PID, LISTEN_FDS
 * and LISTEN_FDNAMES, as sd_listen_fds(3) does when asked to unset the
 * environment, and later calls (for
 * this or another server) take none. Set-up thread only, before
 * `nbdkit_main_loop`.
 *
 * Returns how many sockets were taken (0 when the process was not
 * socket-activated or they were taken already), or a negative errno.
 */
int nbdkit_server_listen_systemd(struct nbdkit_server *srv);

/**
 * Serves one client already connected on socket `fd` (Unix or TCP), for
 * example fd 0 of a server started as a client's subprocess over a
 * socketpair. The server takes ownership of `fd`. If the server has no
 * listening socket, the loop ends when that client disconnects. Set-up
 * thread only, before `nbdkit_main_loop`.
 *
 * Returns 0 or a negative errno (-ENOTSOCK and the like for a pipe or file).
 */
int nbdkit_server_serve_fd(struct nbdkit_server *srv, int fd);

/**
 * Serves the export read-only when `readonly` is non-zero (the plugin's
 * `open` gets readonly=1). Set-up thread only. Returns 0 or a negative errno.
 */
int nbdkit_server_set_readonly(struct nbdkit_server *srv, int readonly);

/**
 * Names the export (default ""). Clients asking for "" get this export;
 * any other name is refused with NBD_REP_ERR_UNKNOWN. The string is
 * copied. Set-up thread only. Returns 0 or a negative errno.
 *
 * # Safety
 * `name` must be a NUL-terminated string.
 */
int nbdkit_server_set_export_name(struct nbdkit_server *srv, const char *name);

/**
 * Sets the export's description, shown by `nbdinfo` (NBD_INFO_DESCRIPTION
 * and NBD_OPT_LIST). NULL removes it. The string is copied. Set-up
 * thread only. Returns 0 or a negative errno.
 *
 * # Safety
 * `description` must be NULL or a NUL-terminated string.
 */
int nbdkit_server_set_export_description(struct nbdkit_server *srv, const char *description);

/**
 * Caps the ops one connection may have in flight (default 4096). When a
 * connection reaches it, the server stops reading its requests until
 * replies go out: back-pressure, never dropped requests. Set-up thread
 * only. Returns 0, or -EINVAL for 0.
 */
int nbdkit_server_set_max_inflight(struct nbdkit_server *srv, uint32_t max_ops);

/**
 * Sets the largest READ or WRITE a client may send, in bytes (default
 * 64 MiB, as nbdkit; at least 512, at most 1 GiB). It is advertised to
 * clients as the maximum block size (NBD_INFO_BLOCK_SIZE); a plugin's
 * `block_size` maximum above it is lowered to it. Larger requests are
 * refused with EINVAL (a client sending a larger payload with extended
 * headers is disconnected). Set-up thread only. Returns 0, or -EINVAL
 * for a size outside 512 bytes to 1 GiB.
 */
int nbdkit_server_set_max_request_size(struct nbdkit_server *srv, uint32_t bytes);

/**
 * Sets how many worker threads run a synchronous plugin's callbacks
 * (default 16, like nbdkit). Ignored for asynchronous plugins, which get
 * no threads from the library. Set-up thread only. Returns 0, or -EINVAL for 0.
 */
int nbdkit_server_set_threads(struct nbdkit_server *srv, uint32_t threads);

/**
 * Serves connections from `loops` event loops, each on a thread of its
 * own, instead of one (the default), so that a server with many clients
 * uses more than one core. New connections go to the loops in turn, and
 * each connection stays on its loop: its `open`, I/O callbacks, `cancel`
 * and `close` all run on that loop's thread. What changes for the plugin:
 * callbacks of different connections run at once on different threads,
 * so state they share (an export table, a cache, the `list_exports` data)
 * must be thread-safe; a reply may be given from any thread as before.
 * `nbdkit_main_loop` runs the first loop on its caller's thread and starts
 * the others; `nbdkit_server_process` serves one loop only and refuses a
 * server set to more. At `nbdkit_server_free`, the `close` of a connection
 * whose ops the plugin still held runs on its own loop's thread. The memory limit over all connections is shared out
 * evenly between the loops. Set-up thread only.
 *
 * Returns 0; -EINVAL for 0 or more than 64; -ENOTSUP for a synchronous
 * plugin (give it more threads with `nbdkit_server_set_threads`).
 */
int nbdkit_server_set_loops(struct nbdkit_server *srv,
                            uint32_t loops);

/**
 * Caps the connections served at once (0, the default, means no cap).
 * Clients over the cap are accepted and closed at once. Set-up thread
 * only. Returns 0 or a negative errno.
 */
int nbdkit_server_set_max_connections(struct nbdkit_server *srv, uint32_t max_connections);

/**
 * Caps the memory clients can make the server hold: request payloads,
 * read buffers and unsent replies, per connection (default 64 MiB) and
 * over all connections (default 1 GiB). A connection at its cap, or any
 * connection holding memory while the total is at its cap, gets no new
 * request read until replies go out; one connection at a time that holds
 * nothing may still start one (a turn that passes on after it stalls for
 * a second), so no client starves. A WRITE payload, once started, is
 * received to its end: each connection receiving one may overshoot a cap
 * by that request's size (see `nbdkit_server_set_max_request_size`); its
 * buffer grows with what the client actually sent, so a client stalling
 * mid-payload holds at most that (cap connections with
 * `nbdkit_server_set_max_connections` to bound those). Independently, a
 * client whose unsent replies pass 4 MiB gets no new request read until
 * it reads them. 0 keeps a default. Set-up thread only. Returns 0 or a
 * negative errno.
 */
int nbdkit_server_set_memory_limits(struct nbdkit_server *srv, size_t per_connection, size_t total);

/**
 * A client must finish the handshake within `ms` milliseconds or be
 * disconnected (default 10000; 0 means no limit). Set-up thread only.
 * Returns 0 or a negative errno.
 */
int nbdkit_server_set_handshake_timeout_ms(struct nbdkit_server *srv, uint32_t ms);

/**
 * When the plugin has not replied to an op within `ms` milliseconds, the
 * client is answered with an error (EIO on the wire) and the plugin's
 * late reply becomes a logged no-op. The op's buffer stays valid until
 * that late reply. 0 (the default) means no timeout. Set-up thread only.
 * Returns 0 or a negative errno.
 */
int nbdkit_server_set_request_timeout_ms(struct nbdkit_server *srv, uint32_t ms);

/**
 * How long shutdown waits for the plugin to answer ops in flight before
 * answering their clients ESHUTDOWN and returning from
 * `nbdkit_main_loop`. Negative (the default) waits for every reply.
 * Ops still unanswered then are released by `nbdkit_server_free`, which
 * must therefore come after the plugin has stopped touching them.
 * Set-up thread only. Returns 0 or a negative errno.
 */
int nbdkit_server_set_shutdown_grace_ms(struct nbdkit_server *srv, int64_t ms);

/**
 * Runs the server on the calling thread until `nbdkit_server_shutdown` or
 * `nbdkit_shutdown`. On shutdown it stops accepting clients and reading
 * requests, waits for every op in flight to be answered (by the plugin,
 * or with ESHUTDOWN once the shutdown grace has passed) and for the
 * replies to reach clients, closes every connection, and returns.
 *
 * `open`, `close`, the capability callbacks and an async plugin's I/O
 * callbacks run on this thread (see the header's opening comment for the
 * rest). Call it once per server, from the thread that owns it.
 *
 * Returns 0 after a clean shutdown, -EBUSY at once when the loop is
 * already running (a second call, from any thread or from a callback) or
 * has run, -EIO after an internal error (logged; the server's memory is
 * then kept so that buffers the plugin holds stay valid), or another
 * negative errno when the loop could not start (a listening socket, TLS).
 */
int nbdkit_main_loop(struct nbdkit_server *srv);

/**
 * Asks one server's loop to shut down (see `nbdkit_main_loop`) and
 * returns at once without waiting for it. Thread-safe: call it from any
 * thread (callbacks included), any number of times, before, while or
 * after the loop runs; a loop not yet started stops as soon as it starts.
 *
 * Returns 0 when the request is recorded, or -EINVAL for a NULL server.
 */
int nbdkit_server_shutdown(struct nbdkit_server *srv);

/**
 * Asks every server in the process to shut down and returns at once.
 * Async-signal-safe: meant to be called from a SIGINT/SIGTERM handler
 * (it only does an atomic add and a write(2)). Also callable from any
 * thread. Servers created afterwards are not affected.
 */
void nbdkit_shutdown(void);

/**
 * Fills `out` (of `size` bytes, normally `sizeof *out`) with the server's
 * counters. A larger `size` (a program built against a newer header)
 * gets the fields this library does not know set to 0. Thread-safe:
 * call from any thread (callbacks included) at any time while the server
 * exists. Each counter is exact; together they are a snapshot taken
 * while the server keeps running.
 *
 * Returns 0 or a negative errno.
 *
 * # Safety
 * `out` must point to `size` writable bytes.
 */
int nbdkit_server_stats(struct nbdkit_server *srv, struct nbdkit_stats *out, size_t size);

/**
 * Adds the range `offset`..`offset + length` with allocation `type_`
 * (NBDKIT_EXTENT_HOLE and/or NBDKIT_EXTENT_ZERO, or 0 for data) to the
 * extents an `extents` callback is building. Ranges must follow each
 * other without gaps; a range that starts before the next expected
 * offset is trimmed to it (so a plugin may report from an aligned start).
 * Call only from inside the `extents` callback, on its thread.
 *
 * Returns 0, or -EINVAL (NULL, a gap, or after more than a million
 * extents: the client asks again for the rest).
 *
 * # Safety
 * `extents` must be the pointer the `extents` callback received.
 */
int nbdkit_add_extent(struct nbdkit_extents_builder *extents,
                      uint64_t offset,
                      uint64_t length,
                      uint32_t type_);

/**
 * Sets the error a synchronous I/O callback reports when it returns -1
 * (otherwise `errno` is used, then EIO). Call it on the thread running
 * the callback, before returning. Has no effect elsewhere.
 */
void nbdkit_set_error(int errnum);

/**
 * Sets the TLS mode (NBDKIT_TLS_*). A mode other than OFF needs
 * certificates (`nbdkit_server_set_tls_certificates` or
 * `nbdkit_server_set_tls_pem`); `nbdkit_main_loop` fails without them.
 * Set-up thread only. Returns 0 or a negative errno.
 */
int nbdkit_server_set_tls(struct nbdkit_server *srv, int mode);

/**
 * Loads the server's certificate and key from a directory laid out as
 * nbdkit, qemu and libnbd expect: `server-cert.pem` (the chain, leaf
 * first) and `server-key.pem`, plus `ca-cert.pem` if present (used to
 * verify clients, see `nbdkit_server_set_tls_verify_peer`). The files
 * are read and checked now (PEM syntax, the key matching the
 * certificate, a key type and size the TLS stack accepts: RSA of 2048
 * bits or more, ECDSA, Ed25519); an error names the file and the reason
 * in the log. Set-up thread only. Returns 0, or a negative errno: the
 * file's errno (ENOENT, EACCES) when it cannot be read, EINVAL when its
 * contents are refused; the settings are then unchanged.
 *
 * # Safety
 * `dir` must be a NUL-terminated string.
 */
int nbdkit_server_set_tls_certificates(struct nbdkit_server *srv, const char *dir);

/**
 * Sets the server's certificate chain and key, and optionally the CA
 * for client verification, from PEM text in memory (copied). `ca_pem`
 * may be NULL. They are checked now, as by
 * `nbdkit_server_set_tls_certificates`. Set-up thread only. Returns 0,
 * or -EINVAL (logged with the reason) when they are refused.
 *
 * # Safety
 * Each non-NULL argument must be a NUL-terminated string.
 */
int nbdkit_server_set_tls_pem(struct nbdkit_server *srv,
                              const char *certificate_chain_pem,
                              const char *private_key_pem,
                              const char *ca_pem);

/**
 * Requires TLS clients to present a certificate signed by the CA
 * (`ca-cert.pem`, or `ca_pem`) when `verify` is non-zero: mutual TLS.
 * Others fail the TLS handshake. Set-up thread only. Returns 0 or a
 * negative errno.
 */
int nbdkit_server_set_tls_verify_peer(struct nbdkit_server *srv, int verify);

/**
 * The verified certificate (DER) the TLS client presented, for access
 * control. Only meaningful inside the plugin's `open` callback, on its
 * thread. `len` (if not NULL) receives its size.
 *
 * Returns the certificate's bytes, valid until `open` returns; NULL
 * outside `open`, and when the client did not use TLS or sent no
 * certificate.
 *
 * # Safety
 * `len` must be NULL or point to a writable size_t.
 */
const uint8_t *nbdkit_tls_peer_certificate(size_t *len);

/**
 * The version of the library the program runs against (the same
 * numbers as the header's NBDKIT_ASYNC_VERSION_* when they match).
 * Thread-safe; callable at any time.
 *
 * Returns a static "MAJOR.MINOR.MICRO" string: never free it.
 */
const char *nbdkit_async_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* NBDKIT_ASYNC_H */
