/* sync_harness: a synchronous plugin (struct nbdkit_plugin served by
 * nbdkit_server_new_sync) on an in-memory disk, for tests/test_sync_api.py.
 *
 *   sync_harness --model MODEL --unix PATH [--threads N] [--sleep-ms N]
 *                [--fail-errno E] [--size BYTES] [--shared-handle]
 *
 * MODEL is serialize-connections, serialize-all-requests, serialize-requests
 * or parallel: the thread_model the plugin declares. --threads N calls
 * nbdkit_server_set_threads (otherwise the library default is kept).
 * The disk (default 16 MiB) starts out holding byte (offset % 251) at every
 * offset. Every pread/pwrite sleeps --sleep-ms (default 0) while counted as
 * running, so overlapping callbacks are observable.
 *
 * What is recorded (atomics): the most I/O callbacks (pread, pwrite, flush,
 * trim, zero, cache) running at once in the whole server and on any one
 * handle, and the most handles (connections) open at once. Every open
 * returns a fresh handle struct, freed by close; with --shared-handle every
 * open returns the same static struct instead (as a plugin without per-
 * connection state does), so max_per_handle then counts all connections.
 *
 * --fail-errno E turns on the error paths:
 *   pwrite                 nbdkit_set_error(E), errno = EINVAL, returns -1
 *                          (the client must see E: nbdkit_set_error wins)
 *   pread at [1 MiB, +4K)  errno = ENOMEM, no nbdkit_set_error, returns -1
 *   pread at [2 MiB, +4K)  errno = 0, no nbdkit_set_error, returns -1 (EIO)
 *   flush                  nbdkit_set_error(E), then returns 0: success, and
 *                          the stale error must not leak into a later call
 *
 * stdout (line-buffered): the URI first, "nbd+unix:///?socket=PATH"; after
 * nbdkit_main_loop returned and the server was freed:
 *   max_global N / max_per_handle N / max_open N / opens N / closes N /
 *   calls N / main_loop returned R
 * On SIGUSR1 a line of the server's counters (see harness.h):
 *   STATS connections=N connections_total=N in_flight=N req=... ...
 * Self-check failures go to stderr prefixed "HARNESS-ERROR"; the exit
 * status is 0 only when main_loop returned 0 and no self-check failed.
 * SIGTERM and SIGINT call nbdkit_shutdown().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-async.h>

#include "harness.h"

#define MIB (UINT64_C (1) << 20)
#define HANDLE_MAGIC UINT32_C (0x73796e63)
#define ERRNO_ONLY_OFFSET (1 * MIB)
#define ERRNO_ZERO_OFFSET (2 * MIB)
#define MAGIC_LEN 4096

struct handle {
  uint32_t magic;
  unsigned id;
  atomic_int running;           /* I/O callbacks running on this handle */
};

static unsigned char *disk;
static uint64_t disk_size = 16 * MIB;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;
static long sleep_ms;
static int fail_errno;
static int shared_handle;
static struct handle the_shared_handle;

static atomic_int cur_global, max_global, max_per_handle;
static atomic_int cur_open, max_open, opens, closes, calls;

static void
update_max (atomic_int *max, int v)
{
  int m = atomic_load (max);
  while (v > m && !atomic_compare_exchange_weak (max, &m, v))
    ;
}

static struct handle *
check_handle (void *hv, const char *what)
{
  struct handle *h = hv;
  if (h == NULL || h->magic != HANDLE_MAGIC) {
    harness_error ("%s: bad handle %p", what, hv);
    abort ();
  }
  return h;
}

static struct handle *
enter (void *hv, const char *what)
{
  struct handle *h = check_handle (hv, what);
  atomic_fetch_add (&calls, 1);
  update_max (&max_global, atomic_fetch_add (&cur_global, 1) + 1);
  update_max (&max_per_handle, atomic_fetch_add (&h->running, 1) + 1);
  return h;
}

static void
leave (struct handle *h)
{
  atomic_fetch_sub (&h->running, 1);
  atomic_fetch_sub (&cur_global, 1);
}

static void
nap (void)
{
  if (sleep_ms <= 0)
    return;
  struct timespec ts = { sleep_ms / 1000, (sleep_ms % 1000) * 1000000L };
  while (nanosleep (&ts, &ts) == -1 && errno == EINTR)
    ;
}

static int
in_range (uint64_t offset, uint32_t count)
{
  return offset <= disk_size && count <= disk_size - offset;
}

static int
hits (uint64_t offset, uint32_t count, uint64_t magic)
{
  return offset < magic + MAGIC_LEN && offset + count > magic;
}

/* ------------------------------------------------------------ callbacks */

static void *
h_open (void *user_data, int readonly, const char *export_name)
{
  (void) readonly; (void) export_name;
  if (user_data != &disk)
    harness_error ("open: user_data %p, expected %p", user_data, (void *) &disk);
  struct handle *h = shared_handle ? &the_shared_handle : calloc (1, sizeof *h);
  if (h == NULL)
    return NULL;
  h->magic = HANDLE_MAGIC;
  h->id = (unsigned) atomic_fetch_add (&opens, 1) + 1;
  if (!shared_handle)
    atomic_init (&h->running, 0);
  update_max (&max_open, atomic_fetch_add (&cur_open, 1) + 1);
  return h;
}

static void
h_close (void *hv)
{
  struct handle *h = check_handle (hv, "close");
  atomic_fetch_sub (&cur_open, 1);
  atomic_fetch_add (&closes, 1);
  if (shared_handle)
    return;
  if (atomic_load (&h->running) != 0)
    harness_error ("close of handle %u with %d callbacks running",
                   h->id, atomic_load (&h->running));
  h->magic = 0;
  free (h);
}

static int64_t
h_get_size (void *hv)
{
  check_handle (hv, "get_size");
  return (int64_t) disk_size;
}

static int h_can_multi_conn (void *hv) { check_handle (hv, "can_multi_conn"); return 1; }

static int
h_pread (void *hv, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = enter (hv, "pread");
  int r = 0;
  (void) flags;
  nap ();
  if (!in_range (offset, count)) {
    harness_error ("pread out of range: %u at %llu", count, (unsigned long long) offset);
    nbdkit_set_error (EINVAL);
    r = -1;
  }
  else if (fail_errno && hits (offset, count, ERRNO_ONLY_OFFSET)) {
    errno = ENOMEM;             /* errno only */
    r = -1;
  }
  else if (fail_errno && hits (offset, count, ERRNO_ZERO_OFFSET)) {
    errno = 0;                  /* nothing at all: EIO */
    r = -1;
  }
  else {
    pthread_mutex_lock (&disk_lock);
    memcpy (buf, disk + offset, count);
    pthread_mutex_unlock (&disk_lock);
  }
  leave (h);
  return r;
}

static int
h_pwrite (void *hv, const void *buf, uint32_t count, uint64_t offset,
          uint32_t flags)
{
  struct handle *h = enter (hv, "pwrite");
  int r = 0;
  (void) flags;
  nap ();
  if (!in_range (offset, count)) {
    harness_error ("pwrite out of range: %u at %llu", count, (unsigned long long) offset);
    nbdkit_set_error (EINVAL);
    r = -1;
  }
  else if (fail_errno) {
    nbdkit_set_error (fail_errno);
    errno = EINVAL;             /* nbdkit_set_error must win over errno */
    r = -1;
  }
  else {
    pthread_mutex_lock (&disk_lock);
    memcpy (disk + offset, buf, count);
    pthread_mutex_unlock (&disk_lock);
  }
  leave (h);
  return r;
}

static int
h_flush (void *hv, uint32_t flags)
{
  struct handle *h = enter (hv, "flush");
  (void) flags;
  if (fail_errno)
    nbdkit_set_error (fail_errno);   /* ... and succeed anyway */
  leave (h);
  return 0;
}

static int
fill_zero (void *hv, const char *what, uint32_t count, uint64_t offset)
{
  struct handle *h = enter (hv, what);
  int r = 0;
  if (!in_range (offset, count)) {
    harness_error ("%s out of range: %u at %llu", what, count, (unsigned long long) offset);
    nbdkit_set_error (EINVAL);
    r = -1;
  }
  else {
    pthread_mutex_lock (&disk_lock);
    memset (disk + offset, 0, count);
    pthread_mutex_unlock (&disk_lock);
  }
  leave (h);
  return r;
}

static int
h_trim (void *hv, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return fill_zero (hv, "trim", count, offset);
}

static int
h_zero (void *hv, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return fill_zero (hv, "zero", count, offset);
}

static int
h_cache (void *hv, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = enter (hv, "cache");
  (void) count; (void) offset; (void) flags;
  leave (h);
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "sync_harness",
  .open = h_open,
  .close = h_close,
  .get_size = h_get_size,
  .can_multi_conn = h_can_multi_conn,
  .pread = h_pread,
  .pwrite = h_pwrite,
  .flush = h_flush,
  .trim = h_trim,
  .zero = h_zero,
  .cache = h_cache,
};

/* ------------------------------------------------------------ main */

static nbdkit_server *srv;

static void print_stats (void) { harness_print_stats (srv, NULL); }

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *model = NULL;
  long threads = 0, fail = 0;
  const struct harness_opt opts[] = {
    { "--model", HARNESS_STRING, &model, NULL },
    { "--unix", HARNESS_STRING, &unix_path, NULL },
    { "--threads", HARNESS_LONG, &threads, NULL },
    { "--sleep-ms", HARNESS_LONG, &sleep_ms, NULL },
    { "--fail-errno", HARNESS_LONG, &fail, NULL },
    { "--size", HARNESS_SIZE, &disk_size, NULL },
    { "--shared-handle", HARNESS_FLAG, &shared_handle, NULL },
    { NULL, 0, NULL, NULL },
  };
  static const char usage[] =
    "--model serialize-connections|serialize-all-requests|"
    "serialize-requests|parallel --unix PATH [--threads N] [--sleep-ms N]"
    " [--fail-errno E] [--size BYTES] [--shared-handle]";

  harness_init ("sync_harness");
  harness_parse (argc, argv, opts, usage);
  fail_errno = (int) fail;
  if (unix_path == NULL || model == NULL || disk_size > 1024 * MIB)
    harness_usage (usage);
  if (strcmp (model, "serialize-connections") == 0)
    plugin.thread_model = NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS;
  else if (strcmp (model, "serialize-all-requests") == 0)
    plugin.thread_model = NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS;
  else if (strcmp (model, "serialize-requests") == 0)
    plugin.thread_model = NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS;
  else if (strcmp (model, "parallel") == 0)
    plugin.thread_model = NBDKIT_THREAD_MODEL_PARALLEL;
  else
    harness_usage (usage);

  disk = malloc (disk_size);
  if (disk == NULL) {
    perror ("malloc");
    return 1;
  }
  for (uint64_t i = 0; i < disk_size; i++)
    disk[i] = (unsigned char) (i % 251);

  srv = nbdkit_server_new_sync (&plugin, sizeof plugin, &disk);
  if (srv == NULL) {
    fprintf (stderr, "nbdkit_server_new_sync failed\n");
    return 1;
  }
  if (threads > 0 && nbdkit_server_set_threads (srv, (uint32_t) threads) != 0) {
    fprintf (stderr, "nbdkit_server_set_threads failed\n");
    return 1;
  }
  harness_signals (NULL, print_stats, NULL);

  int r = harness_listen (srv, unix_path);
  if (r < 0)
    return 1;
  harness_say ("nbd+unix:///?socket=%s", unix_path);

  r = nbdkit_main_loop (srv);
  harness_signals_end ();
  nbdkit_server_free (srv);     /* joins the workers, closes what is left */
  srv = NULL;

  if (atomic_load (&cur_global) != 0)
    harness_error ("%d callbacks still running after the server was freed",
                   atomic_load (&cur_global));
  if (atomic_load (&opens) != atomic_load (&closes))
    harness_error ("%d handles opened, %d closed",
                   atomic_load (&opens), atomic_load (&closes));
  harness_say ("max_global %d", atomic_load (&max_global));
  harness_say ("max_per_handle %d", atomic_load (&max_per_handle));
  harness_say ("max_open %d", atomic_load (&max_open));
  harness_say ("opens %d", atomic_load (&opens));
  harness_say ("closes %d", atomic_load (&closes));
  harness_say ("calls %d", atomic_load (&calls));
  harness_say ("main_loop returned %d", r);
  free (disk);
  return harness_status (r);
}
