/* contract_harness: the promises of the C API under misuse, for
 * tests/test_contract.py. Each case either checks itself and exits (0 when
 * every check held, "CONTRACT-ERROR ..." on stderr otherwise), or serves a
 * small in-memory disk on --unix PATH for a real client ("ready" on stdout).
 * An alarm ends the process with SIGALRM if a call hangs: a hang is the
 * bug most of these cases look for.
 *
 *   contract_harness --case CASE [--unix PATH]
 *
 *   main-loop-twice  nbdkit_main_loop called from a second thread while it
 *                    runs, from inside a callback, and again after it
 *                    returned: each -EBUSY at once. Needs --unix and a
 *                    client that reads once (the callback case).
 *   reentry-main     the `open` callback calls every server function back:
 *   reentry-embedded set-up calls, the loop calls, the log callback setter
 *                    and nbdkit_server_free; with nbdkit_main_loop or with
 *                    nbdkit_server_process. Each must answer (mostly -EBUSY)
 *                    without blocking. Needs --unix and a client.
 *   log-reentry      a log callback that calls back into the library while
 *                    a set-up call is logging.
 *   errors           errno from nbdkit_server_new, unambiguous returns of
 *                    the NULL-server cases, stats from a newer header, the
 *                    runtime version, nbdkit_log's checks.
 *   systemd-once     socket activation taken by the first call only, with
 *                    LISTEN_* cleared.
 *   returns          serves: pwrite returns -ENOSPC below 1 MiB; trim
 *                    returns 1 (a bug) and replies 200 ms later from a
 *                    thread; open fails by export name ("eio", "enomem",
 *                    "enospc", "errno0", "eperm", "enoent"). Needs --unix.
 *   max-request      serves with nbdkit_server_set_max_request_size 1 MiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-async.h>

#include "harness.h"

#define DISK_SIZE (16u << 20)

static unsigned char disk[DISK_SIZE];
static nbdkit_server *srv;
static const char *unix_path;
static int failures;

static void
check (int ok, const char *fmt, ...)
{
  if (ok)
    return;
  va_list ap;
  va_start (ap, fmt);
  fputs ("CONTRACT-ERROR ", stderr);
  vfprintf (stderr, fmt, ap);
  fputc ('\n', stderr);
  va_end (ap);
  failures++;
}

#define CHECK_RC(call, want) \
  do { int rc_ = (call); check (rc_ == (want), "%s = %d, expected %d", #call, rc_, want); } while (0)

/* ---------------------------------------------------------------- plugin */

static void *
d_open (void *ud, int ro, const char *name)
{
  (void) ud; (void) ro;
  static const struct { const char *name; int err; } refusals[] = {
    { "eio", EIO }, { "enomem", ENOMEM }, { "enospc", ENOSPC },
    { "errno0", 0 }, { "eperm", EPERM }, { "enoent", ENOENT },
  };
  for (size_t i = 0; i < sizeof refusals / sizeof refusals[0]; i++)
    if (strcmp (name, refusals[i].name) == 0) {
      errno = refusals[i].err;
      return NULL;
    }
  return disk;
}

static int64_t d_size (void *h) { (void) h; return DISK_SIZE; }

static int
d_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) h; (void) flags;
  memcpy (buf, disk + offset, count);
  nbdkit_reply (op);
  return 0;
}

static int
d_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  if (offset < (1u << 20))
    return -ENOSPC;                   /* a negative errno, returned */
  memcpy (disk + offset, buf, count);
  nbdkit_reply (op);
  return 0;
}

static void *
late_reply (void *op)
{
  struct timespec t = { 0, 200 * 1000 * 1000 };
  nanosleep (&t, NULL);
  int rc = nbdkit_reply (op);
  printf ("late trim reply rc %d\n", rc);
  return NULL;
}

static int
d_trim (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) count; (void) offset; (void) flags;
  pthread_t t;
  pthread_create (&t, NULL, late_reply, op);
  pthread_detach (t);
  return 1;                           /* a bug: neither 0 nor negative */
}

static int
d_list (void *ud, nbdkit_exports *e)
{
  (void) ud;
  const char *names[] = { "", "eio", "enomem", "enospc", "errno0", "eperm" };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    nbdkit_add_export (e, names[i], NULL);
  return 0;
}

static struct nbdkit_plugin_lowlevel plugin = {
  .name = "contract",
  .open = d_open,
  .get_size = d_size,
  .pread = d_pread,
  .pwrite = d_pwrite,
  .trim = d_trim,
  .list_exports = d_list,
};

/* ---------------------------------------------------------------- helpers */

static nbdkit_server *
new_server (void)
{
  nbdkit_server *s = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (s == NULL) {
    perror ("nbdkit_server_new");
    exit (EXIT_FAILURE);
  }
  return s;
}

static void
listen_here (nbdkit_server *s)
{
  if (unix_path == NULL || nbdkit_server_listen_unix (s, unix_path) < 0) {
    fprintf (stderr, "contract_harness: --unix PATH is needed and must work\n");
    exit (EXIT_FAILURE);
  }
}

static void
ready (void)
{
  harness_say ("ready");
}

/* ---------------------------------------------------------------- cases */

/* main-loop-twice */

static atomic_int second_rc = 1;

static void *
second_main_loop (void *arg)
{
  (void) arg;
  atomic_store (&second_rc, nbdkit_main_loop (srv));
  return NULL;
}

static void *
twice_open (void *ud, int ro, const char *name)
{
  (void) ud; (void) ro; (void) name;
  /* Called back from inside the loop it would start. */
  CHECK_RC (nbdkit_main_loop (srv), -EBUSY);
  pthread_t t;
  pthread_create (&t, NULL, second_main_loop, NULL);
  pthread_join (t, NULL);
  check (atomic_load (&second_rc) == -EBUSY,
         "nbdkit_main_loop from a second thread = %d, expected -EBUSY",
         atomic_load (&second_rc));
  nbdkit_server_shutdown (srv);
  printf ("open checked\n");
  return disk;
}

static int
case_main_loop_twice (void)
{
  plugin.open = twice_open;
  srv = new_server ();
  listen_here (srv);
  ready ();
  CHECK_RC (nbdkit_main_loop (srv), 0);
  CHECK_RC (nbdkit_main_loop (srv), -EBUSY);   /* after it returned */
  nbdkit_server_free (srv);
  return 0;
}

/* reentry-main, reentry-embedded */

static void
log_to_stderr (void *ud, int level, const char *msg)
{
  (void) ud;
  fprintf (stderr, "log %d: %s\n", level, msg);
}

static void *
reentry_open (void *ud, int ro, const char *name)
{
  (void) ud; (void) ro; (void) name;
  CHECK_RC (nbdkit_server_set_readonly (srv, 1), -EBUSY);
  CHECK_RC (nbdkit_server_set_export_name (srv, "x"), -EBUSY);
  CHECK_RC (nbdkit_server_set_max_inflight (srv, 8), -EBUSY);
  CHECK_RC (nbdkit_server_set_max_request_size (srv, 4096), -EBUSY);
  CHECK_RC (nbdkit_server_set_tls (srv, NBDKIT_TLS_OFF), -EBUSY);
  CHECK_RC (nbdkit_server_listen_unix (srv, "/nonexistent/x.sock"), -EBUSY);
  CHECK_RC (nbdkit_server_listen_systemd (srv), -EBUSY);
  CHECK_RC (nbdkit_server_serve_fd (srv, 0), -EBUSY);
  CHECK_RC (nbdkit_main_loop (srv), -EBUSY);
  CHECK_RC (nbdkit_server_process (srv), -EBUSY);
  CHECK_RC (nbdkit_server_timeout_ms (srv), -EBUSY);
  struct nbdkit_stats st;
  CHECK_RC (nbdkit_server_stats (srv, &st, sizeof st), 0);
  check (st.connections >= 1, "stats inside open: %lu connections",
         (unsigned long) st.connections);
  nbdkit_server_free (srv);              /* refused: the loop is running */
  nbdkit_set_log_callback (log_to_stderr, NULL, NBDKIT_LOG_WARN);
  printf ("open checked\n");
  return disk;
}

static int
case_reentry (int embedded)
{
  plugin.open = reentry_open;
  srv = new_server ();
  listen_here (srv);
  int fd = nbdkit_server_fd (srv);
  check (fd >= 0, "nbdkit_server_fd = %d", fd);
  ready ();
  if (!embedded)
    CHECK_RC (nbdkit_main_loop (srv), 0);
  else {
    int r;
    while ((r = nbdkit_server_process (srv)) == 1) {
      int ms = nbdkit_server_timeout_ms (srv);
      check (ms >= -1, "nbdkit_server_timeout_ms = %d", ms);
      struct timespec t = { 0, 2 * 1000 * 1000 };
      nanosleep (&t, NULL);                /* a poll(fd) would do */
    }
    CHECK_RC (r, 0);
    CHECK_RC (nbdkit_server_timeout_ms (srv), -1);   /* stopped */
  }
  nbdkit_server_free (srv);
  return 0;
}

/* log-reentry */

static atomic_int log_reentry_rc = 1;

static void
reentrant_log (void *ud, int level, const char *msg)
{
  (void) ud; (void) level; (void) msg;
  /* A set-up call from inside a log line that a set-up call wrote. */
  if (atomic_load (&log_reentry_rc) == 1)
    atomic_store (&log_reentry_rc, nbdkit_server_set_readonly (srv, 1));
  nbdkit_set_log_callback (NULL, NULL, 0);   /* ignored: we are inside it */
}

static int
case_log_reentry (void)
{
  srv = new_server ();
  nbdkit_set_log_callback (reentrant_log, NULL, NBDKIT_LOG_ERROR);
  /* Refused and logged: the log callback runs inside this call. */
  CHECK_RC (nbdkit_server_set_max_request_size (srv, 1), -EINVAL);
  check (atomic_load (&log_reentry_rc) == -EBUSY,
         "set-up call from the log callback = %d, expected -EBUSY",
         atomic_load (&log_reentry_rc));
  nbdkit_set_log_callback (NULL, NULL, NBDKIT_LOG_WARN);
  CHECK_RC (nbdkit_server_set_readonly (srv, 1), 0);
  nbdkit_server_free (srv);
  return 0;
}

/* errors */

struct newer_plugin {
  struct nbdkit_plugin_lowlevel p;
  void (*from_the_future) (void);
};

static void future (void) {}

static int
case_errors (void)
{
  errno = 0;
  check (nbdkit_server_new (NULL, 0, NULL) == NULL && errno == EINVAL,
         "nbdkit_server_new (NULL): errno %d, expected EINVAL", errno);
  struct nbdkit_plugin_lowlevel no_pread = { .get_size = d_size };
  errno = 0;
  check (nbdkit_server_new (&no_pread, sizeof no_pread, NULL) == NULL &&
         errno == EINVAL, "plugin without pread: errno %d, expected EINVAL", errno);
  struct newer_plugin newer = { .p = plugin, .from_the_future = future };
  errno = 0;
  check (nbdkit_server_new (&newer.p, sizeof newer, NULL) == NULL &&
         errno == ENOTSUP, "plugin from a newer header: errno %d, expected ENOTSUP",
         errno);

  CHECK_RC (nbdkit_server_timeout_ms (NULL), -EINVAL);
  CHECK_RC (nbdkit_server_shutdown (NULL), -EINVAL);
  CHECK_RC (nbdkit_server_fd (NULL), -EINVAL);
  CHECK_RC (nbdkit_server_process (NULL), -EINVAL);
  CHECK_RC (nbdkit_main_loop (NULL), -EINVAL);

  srv = new_server ();
  CHECK_RC (nbdkit_server_timeout_ms (srv), -1);   /* no deadline yet */
  CHECK_RC (nbdkit_server_shutdown (srv), 0);
  CHECK_RC (nbdkit_server_set_max_request_size (srv, 0), -EINVAL);
  CHECK_RC (nbdkit_server_set_max_request_size (srv, 2u << 30), -EINVAL);

  /* A caller built against a newer, larger struct. */
  unsigned char big[sizeof (struct nbdkit_stats) + 64];
  memset (big, 0xff, sizeof big);
  CHECK_RC (nbdkit_server_stats (srv, (struct nbdkit_stats *) big, sizeof big), 0);
  int tail_zero = 1;
  for (size_t i = sizeof (struct nbdkit_stats); i < sizeof big; i++)
    tail_zero &= big[i] == 0;
  check (tail_zero, "stats fields the library does not know were not zeroed");
  nbdkit_server_free (srv);

  char want[32];
  snprintf (want, sizeof want, "%d.%d.%d", NBDKIT_ASYNC_VERSION_MAJOR,
            NBDKIT_ASYNC_VERSION_MINOR, NBDKIT_ASYNC_VERSION_MICRO);
  check (strcmp (nbdkit_async_version (), want) == 0,
         "nbdkit_async_version () = %s, header says %s", nbdkit_async_version (), want);

  CHECK_RC (nbdkit_log (NBDKIT_LOG_WARN, "a line from the host"), 0);
  CHECK_RC (nbdkit_log (0, "x"), -EINVAL);
  CHECK_RC (nbdkit_log (NBDKIT_LOG_WARN, NULL), -EINVAL);
  return 0;
}

/* systemd-once */

static int
case_systemd_once (void)
{
  int l = socket (AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = { .sun_family = AF_UNIX };
  snprintf (a.sun_path, sizeof a.sun_path, "%s", unix_path);
  if (l < 0 || bind (l, (struct sockaddr *) &a, sizeof a) < 0 || listen (l, 8) < 0 ||
      dup2 (l, 3) < 0) {
    perror ("contract_harness: activation socket");
    return EXIT_FAILURE;
  }
  if (l != 3)
    close (l);
  char pid[32];
  snprintf (pid, sizeof pid, "%d", (int) getpid ());
  setenv ("LISTEN_PID", pid, 1);
  setenv ("LISTEN_FDS", "1", 1);
  setenv ("LISTEN_FDNAMES", "nbd", 1);

  nbdkit_server *a1 = new_server (), *a2 = new_server ();
  CHECK_RC (nbdkit_server_listen_systemd (a1), 1);
  CHECK_RC (nbdkit_server_listen_systemd (a2), 0);   /* already taken */
  check (getenv ("LISTEN_FDS") == NULL && getenv ("LISTEN_PID") == NULL &&
         getenv ("LISTEN_FDNAMES") == NULL, "LISTEN_* left in the environment");
  nbdkit_server_free (a2);
  nbdkit_server_free (a1);
  return 0;
}

/* returns, max-request */

static int
serve (void)
{
  srv = new_server ();
  listen_here (srv);
  ready ();
  int r = nbdkit_main_loop (srv);
  printf ("main_loop returned %d\n", r);
  nbdkit_server_free (srv);
  return r == 0 ? 0 : EXIT_FAILURE;
}

static int
serve_max_request (void)
{
  srv = new_server ();
  CHECK_RC (nbdkit_server_set_max_request_size (srv, 1u << 20), 0);
  listen_here (srv);
  ready ();
  int r = nbdkit_main_loop (srv);
  nbdkit_server_free (srv);
  return r == 0 ? 0 : EXIT_FAILURE;
}

int
main (int argc, char *argv[])
{
  const char *name = NULL;
  const struct harness_opt opts[] = {
    { "--case", HARNESS_STRING, &name, NULL },
    { "--unix", HARNESS_STRING, &unix_path, NULL },
    { NULL, 0, NULL, NULL },
  };

  harness_init ("contract_harness");
  harness_parse (argc, argv, opts, "--case CASE [--unix PATH]");
  if (name == NULL)
    harness_usage ("--case CASE [--unix PATH]");
  harness_signals (NULL, NULL, NULL);     /* SIGTERM, SIGINT: nbdkit_shutdown */
  alarm (20);                /* a hung call ends the process with SIGALRM */

  int r;
  if (strcmp (name, "main-loop-twice") == 0) r = case_main_loop_twice ();
  else if (strcmp (name, "reentry-main") == 0) r = case_reentry (0);
  else if (strcmp (name, "reentry-embedded") == 0) r = case_reentry (1);
  else if (strcmp (name, "log-reentry") == 0) r = case_log_reentry ();
  else if (strcmp (name, "errors") == 0) r = case_errors ();
  else if (strcmp (name, "systemd-once") == 0) r = case_systemd_once ();
  else if (strcmp (name, "returns") == 0) r = serve ();
  else if (strcmp (name, "max-request") == 0) r = serve_max_request ();
  else {
    fprintf (stderr, "contract_harness: unknown case %s\n", name);
    return EXIT_FAILURE;
  }
  if (failures)
    return EXIT_FAILURE;
  printf ("contract held\n");
  return r;
}
