/* embed_harness: an asynchronous plugin driven from a host poll(2) loop
 * through nbdkit_server_fd / nbdkit_server_process /
 * nbdkit_server_timeout_ms, for tests/test_system_library.py.
 *
 *   embed_harness --unix PATH [--size N] [--fail-offset OFF]
 *                 [--log-file FILE --log-level L] [--provoke-error PATH]
 *                 [--handshake-timeout-ms N] [--main-loop]
 *
 * The disk is --size bytes (default 16 MiB) of zeroes in memory. Every op
 * is answered from a separate reply thread (replies from a thread that is
 * not the loop's). A read at exactly --fail-offset fails with EIO.
 *
 * --log-file routes the library's log through nbdkit_set_log_callback
 * (max level --log-level) into FILE, one "LEVEL<TAB>MESSAGE" line per
 * message. --provoke-error PATH asks the library to listen on PATH, which
 * the test made a regular file: the library must refuse and log an error.
 *
 * stdout: "ready" once listening; on SIGUSR1 one line
 *   STATS connections=.. connections_total=.. in_flight=.. req=a,b,..,h
 *         bytes_read=.. bytes_written=.. errors=.. lat=l0,l1,...,l31 small=ok|BAD
 * ("small" checks that a smaller, older nbdkit_stats size is honoured: no
 * byte past it is written). SIGTERM/SIGINT: nbdkit_server_shutdown, then
 * the host loop runs until nbdkit_server_process returns 0; exit 0.
 * Harness self-check failures print "HARNESS-ERROR" on stderr, exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-async.h>

#include "harness.h"

static unsigned char *disk;
static uint64_t disk_size = 16 << 20;
static int64_t fail_offset = -1;

/* ---------------------------------------------------------------- replies */

enum kind { K_READ, K_WRITE, K_FLUSH, K_TRIM, K_ZERO };

struct job {
  struct job *next;
  nbdkit_op *op;
  enum kind kind;
  void *buf;
  uint32_t count;
  uint64_t offset;
};

static struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct job *head, *tail;
  bool stopping;
} q = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, false };

static int
submit (nbdkit_op *op, enum kind kind, void *buf, uint32_t count,
        uint64_t offset)
{
  struct job *j = calloc (1, sizeof *j);
  if (j == NULL)
    return -1;
  j->op = op; j->kind = kind; j->buf = buf; j->count = count;
  j->offset = offset;
  pthread_mutex_lock (&q.lock);
  if (q.tail)
    q.tail->next = j;
  else
    q.head = j;
  q.tail = j;
  pthread_cond_signal (&q.cond);
  pthread_mutex_unlock (&q.lock);
  return 0;
}

static void
run (struct job *j)
{
  int r = 0;
  switch (j->kind) {
  case K_READ:
    if ((int64_t) j->offset == fail_offset) {
      r = nbdkit_reply_error (j->op, EIO);
      break;
    }
    memcpy (j->buf, disk + j->offset, j->count);
    r = nbdkit_reply (j->op);
    break;
  case K_WRITE:
    memcpy (disk + j->offset, j->buf, j->count);
    r = nbdkit_reply (j->op);
    break;
  case K_TRIM:
  case K_ZERO:
    memset (disk + j->offset, 0, j->count);
    r = nbdkit_reply (j->op);
    break;
  case K_FLUSH:
    r = nbdkit_reply (j->op);
    break;
  }
  if (r != 0)
    harness_error ("reply returned %d", r);
  free (j);
}

static void *
reply_thread (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&q.lock);
  for (;;) {
    struct job *j = q.head;
    if (j == NULL) {
      if (q.stopping)
        break;
      pthread_cond_wait (&q.cond, &q.lock);
      continue;
    }
    q.head = j->next;
    if (q.head == NULL)
      q.tail = NULL;
    pthread_mutex_unlock (&q.lock);
    run (j);
    pthread_mutex_lock (&q.lock);
  }
  pthread_mutex_unlock (&q.lock);
  return NULL;
}

/* ----------------------------------------------------------------- plugin */

static void *h_open (void *ud, int ro, const char *name)
{ (void) ro; (void) name; return ud; }
static int64_t h_size (void *h) { (void) h; return (int64_t) disk_size; }

static int
h_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{ (void) h; (void) flags; return submit (op, K_READ, buf, count, offset); }

static int
h_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{ (void) h; (void) flags; return submit (op, K_WRITE, (void *) buf, count, offset); }

static int
h_flush (nbdkit_op *op, void *h, uint32_t flags)
{ (void) h; (void) flags; return submit (op, K_FLUSH, NULL, 0, 0); }

static int
h_trim (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{ (void) h; (void) flags; return submit (op, K_TRIM, NULL, count, offset); }

static int
h_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{ (void) h; (void) flags; return submit (op, K_ZERO, NULL, count, offset); }

/* ---------------------------------------------------------------- logging */

static FILE *log_file;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void
log_cb (void *user_data, int level, const char *message)
{
  FILE *f = user_data;
  pthread_mutex_lock (&log_lock);
  fprintf (f, "%d\t", level);
  for (const char *p = message; *p; p++)      /* one line per message */
    fputc (*p == '\n' || *p == '\t' ? ' ' : *p, f);
  fputc ('\n', f);
  fflush (f);
  pthread_mutex_unlock (&log_lock);
}

/* ---------------------------------------------------------------- signals */

static nbdkit_server *the_srv;

static void
print_stats (void)
{
  struct nbdkit_stats st;
  if (nbdkit_server_stats (the_srv, &st, sizeof st) != 0) {
    harness_error ("nbdkit_server_stats failed");
    return;
  }
  /* An older, smaller struct: only its bytes may be written. */
  unsigned char small[sizeof st];
  const size_t small_size = offsetof (struct nbdkit_stats, requests);
  memset (small, 0xAA, sizeof small);
  bool small_ok = nbdkit_server_stats (the_srv, (struct nbdkit_stats *) (void *) small,
                                       small_size) == 0;
  for (size_t i = small_size; i < sizeof small; i++)
    if (small[i] != 0xAA)
      small_ok = false;
  uint64_t conns_total;
  memcpy (&conns_total, small + offsetof (struct nbdkit_stats, connections_total),
          sizeof conns_total);
  if (conns_total != st.connections_total)
    small_ok = false;
  harness_print_stats (the_srv, small_ok ? " small=ok" : " small=BAD");
}

static void stop (void) { nbdkit_server_shutdown (the_srv); }

/* ------------------------------------------------------------------- main */

static int
host_loop (nbdkit_server *srv)
{
  int fd = nbdkit_server_fd (srv);
  if (fd < 0) {
    harness_error ("nbdkit_server_fd: %d", fd);
    return -1;
  }
  for (;;) {
    int r = nbdkit_server_process (srv);
    if (r == 0)
      return 0;
    if (r < 0) {
      harness_error ("nbdkit_server_process: %d", r);
      return -1;
    }
    int timeout = nbdkit_server_timeout_ms (srv);
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    if (poll (&pfd, 1, timeout) < 0 && errno != EINTR) {
      perror ("HARNESS-ERROR: poll");
      return -1;
    }
  }
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *log_path = NULL, *provoke = NULL;
  long log_level = NBDKIT_LOG_WARN, handshake_ms = -1, fail_at = -1;
  int main_loop = 0;
  const struct harness_opt opts[] = {
    { "--unix", HARNESS_STRING, &unix_path, NULL },
    { "--size", HARNESS_SIZE, &disk_size, NULL },
    { "--fail-offset", HARNESS_LONG, &fail_at, NULL },
    { "--log-file", HARNESS_STRING, &log_path, NULL },
    { "--log-level", HARNESS_LONG, &log_level, NULL },
    { "--provoke-error", HARNESS_STRING, &provoke, NULL },
    { "--handshake-timeout-ms", HARNESS_LONG, &handshake_ms, NULL },
    { "--main-loop", HARNESS_FLAG, &main_loop, NULL },
    { NULL, 0, NULL, NULL },
  };
  static const char usage[] =
    "--unix PATH [--size N] [--fail-offset OFF] [--log-file FILE --log-level L]"
    " [--provoke-error PATH] [--handshake-timeout-ms N] [--main-loop]";

  harness_init ("embed_harness");
  harness_parse (argc, argv, opts, usage);
  if (unix_path == NULL)
    harness_usage (usage);
  fail_offset = fail_at;

  if (log_path) {
    log_file = fopen (log_path, "w");
    if (log_file == NULL) {
      perror (log_path);
      return 1;
    }
    nbdkit_set_log_callback (log_cb, log_file, (int) log_level);
  }

  disk = calloc (disk_size ? disk_size : 1, 1);
  if (disk == NULL) {
    perror ("calloc");
    return 1;
  }

  struct nbdkit_plugin_lowlevel plugin = {
    .name = "embed_harness",
    .open = h_open,
    .get_size = h_size,
    .pread = h_pread,
    .pwrite = h_pwrite,
    .flush = h_flush,
    .trim = h_trim,
    .zero = h_zero,
  };
  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, disk);
  if (srv == NULL) {
    harness_error ("nbdkit_server_new returned NULL");
    return 1;
  }
  if (handshake_ms >= 0)
    nbdkit_server_set_handshake_timeout_ms (srv, (uint32_t) handshake_ms);

  if (provoke) {
    int r = nbdkit_server_listen_unix (srv, provoke);
    if (r >= 0) {
      harness_error ("listening on a regular file succeeded");
      return 1;
    }
  }

  the_srv = srv;
  harness_signals (stop, print_stats, NULL);
  pthread_t rep_thr;
  pthread_create (&rep_thr, NULL, reply_thread, NULL);

  int r = nbdkit_server_listen_unix (srv, unix_path);
  if (r < 0) {
    harness_error ("nbdkit_server_listen_unix: %d", r);
    return 1;
  }
  harness_say ("ready");

  r = main_loop ? nbdkit_main_loop (srv) : host_loop (srv);

  pthread_mutex_lock (&q.lock);
  q.stopping = true;
  pthread_cond_broadcast (&q.cond);
  pthread_mutex_unlock (&q.lock);
  pthread_join (rep_thr, NULL);
  harness_signals_end ();

  nbdkit_server_free (srv);
  free (disk);
  if (log_file)
    fclose (log_file);
  return harness_status (r);
}
