/* memdisk: an in-memory disk served over NBD with the asynchronous API.
 *
 * It plays the high-latency backend: every request is queued and finished
 * by a small pool of worker threads once an artificial latency has passed.
 * Thousands of requests can wait at once; no thread is tied to any of
 * them. With a single fixed latency, arrival order is deadline order, so
 * the timer queue is a plain FIFO.
 *
 *   build/memdisk [--unix PATH] [--tcp HOST:PORT] [--size N[K|M|G]]
 *                 [--latency-ms N] [--workers N] [--readonly] [--export NAME]
 *                 [--max-inflight N] [--max-connections N]
 *                 [--handshake-timeout-ms N] [--request-timeout-ms N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-async.h>

enum kind { READ, WRITE, ZERO, FLUSH };

/* One request waiting for its deadline. */
struct job {
  struct job *next;
  nbdkit_op *op;
  enum kind kind;
  void *buf;
  uint32_t count;
  uint64_t offset;
  struct timespec due;
};

static struct {
  unsigned char *data;
  uint64_t size;
  pthread_rwlock_t lock;      /* readers share, writers exclude */
  long latency_ms;

  pthread_mutex_t queue_lock;
  pthread_cond_t queue_cond;  /* signalled on new work and on stop */
  struct job *head, *tail;
  bool stopping;
} disk = {
  .lock = PTHREAD_RWLOCK_INITIALIZER,
  .queue_lock = PTHREAD_MUTEX_INITIALIZER,
};

static struct timespec
deadline_after_ms (long ms)
{
  struct timespec t;
  clock_gettime (CLOCK_MONOTONIC, &t);
  t.tv_sec += ms / 1000;
  t.tv_nsec += (ms % 1000) * 1000000;
  if (t.tv_nsec >= 1000000000) {
    t.tv_sec++;
    t.tv_nsec -= 1000000000;
  }
  return t;
}

static bool
is_due (const struct timespec *due)
{
  struct timespec now;
  clock_gettime (CLOCK_MONOTONIC, &now);
  return now.tv_sec > due->tv_sec ||
    (now.tv_sec == due->tv_sec && now.tv_nsec >= due->tv_nsec);
}

/* Called on the event loop thread: queue and return at once. */
static int
submit (nbdkit_op *op, enum kind kind, void *buf, uint32_t count,
        uint64_t offset)
{
  struct job *j = malloc (sizeof *j);
  if (j == NULL)
    return -1;                  /* errno is ENOMEM: the library replies */
  *j = (struct job) { .op = op, .kind = kind, .buf = buf, .count = count,
                      .offset = offset,
                      .due = deadline_after_ms (disk.latency_ms) };
  pthread_mutex_lock (&disk.queue_lock);
  if (disk.tail)
    disk.tail->next = j;
  else
    disk.head = j;
  disk.tail = j;
  pthread_cond_signal (&disk.queue_cond);
  pthread_mutex_unlock (&disk.queue_lock);
  return 0;
}

static void
run_job (struct job *j)
{
  switch (j->kind) {
  case READ:
    pthread_rwlock_rdlock (&disk.lock);
    memcpy (j->buf, disk.data + j->offset, j->count);
    break;
  case WRITE:
    pthread_rwlock_wrlock (&disk.lock);
    memcpy (disk.data + j->offset, j->buf, j->count);
    break;
  case ZERO:
    pthread_rwlock_wrlock (&disk.lock);
    memset (disk.data + j->offset, 0, j->count);
    break;
  case FLUSH:
    /* RAM is as durable as it gets; the latency was the whole cost. */
    nbdkit_reply (j->op);
    free (j);
    return;
  }
  pthread_rwlock_unlock (&disk.lock);
  nbdkit_reply (j->op);
  free (j);
}

static void *
worker (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&disk.queue_lock);
  for (;;) {
    struct job *j = disk.head;
    if (j == NULL) {
      if (disk.stopping)
        break;
      pthread_cond_wait (&disk.queue_cond, &disk.queue_lock);
    }
    else if (!is_due (&j->due))
      pthread_cond_timedwait (&disk.queue_cond, &disk.queue_lock, &j->due);
    else {
      disk.head = j->next;
      if (disk.head == NULL)
        disk.tail = NULL;
      pthread_mutex_unlock (&disk.queue_lock);
      run_job (j);
      pthread_mutex_lock (&disk.queue_lock);
    }
  }
  pthread_mutex_unlock (&disk.queue_lock);
  return NULL;
}

/* The plugin. Every connection shares the one disk, so every handle is
 * the disk itself and multi-conn is safe.
 */
static void *
md_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly; (void) export_name;
  return &disk;
}

static int64_t md_get_size (void *h) { (void) h; return disk.size; }
static int md_can_multi_conn (void *h) { (void) h; return 1; }

static int
md_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
          uint32_t flags)
{
  (void) h; (void) flags;
  return submit (op, READ, buf, count, offset);
}

static int
md_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  return submit (op, WRITE, (void *) buf, count, offset);
}

static int
md_flush (nbdkit_op *op, void *h, uint32_t flags)
{
  (void) h; (void) flags;
  return submit (op, FLUSH, NULL, 0, 0);
}

static int
md_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) h; (void) flags;
  return submit (op, ZERO, NULL, count, offset);
}

static const struct nbdkit_plugin_lowlevel plugin = {
  .name = "memdisk",
  .open = md_open,
  .get_size = md_get_size,
  .can_multi_conn = md_can_multi_conn,
  .pread = md_pread,
  .pwrite = md_pwrite,
  .flush = md_flush,
  .trim = md_zero,              /* a trimmed range reads back as zeroes */
  .zero = md_zero,
};

static void
on_signal (int sig)
{
  (void) sig;
  nbdkit_shutdown ();           /* async-signal-safe */
}

static uint64_t
parse_size (const char *s)
{
  char *end;
  uint64_t n = strtoull (s, &end, 10);
  switch (*end) {
  case 'K': case 'k': return n << 10;
  case 'M': case 'm': return n << 20;
  case 'G': case 'g': return n << 30;
  case 'T': case 't': return n << 40;
  case '\0': return n;
  default:
    fprintf (stderr, "memdisk: bad size: %s\n", s);
    exit (EXIT_FAILURE);
  }
}

static void
usage (void)
{
  fprintf (stderr,
           "usage: memdisk [--unix PATH] [--tcp HOST:PORT] [--size N[K|M|G]]\n"
           "               [--latency-ms N] [--workers N] [--readonly]"
           " [--export NAME]\n"
           "               [--max-inflight N] [--max-connections N]\n"
           "               [--handshake-timeout-ms N] [--request-timeout-ms N]\n");
  exit (EXIT_FAILURE);
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *tcp = NULL, *export_name = "";
  int workers = 2, readonly = 0;
  long max_inflight = 0, max_connections = 0;
  long handshake_timeout_ms = -1, request_timeout_ms = 0;
  disk.size = 1ULL << 30;

  static const struct option opts[] = {
    { "unix", required_argument, NULL, 'u' },
    { "tcp", required_argument, NULL, 't' },
    { "size", required_argument, NULL, 's' },
    { "latency-ms", required_argument, NULL, 'l' },
    { "workers", required_argument, NULL, 'w' },
    { "readonly", no_argument, NULL, 'r' },
    { "export", required_argument, NULL, 'e' },
    { "max-inflight", required_argument, NULL, 'm' },
    { "max-connections", required_argument, NULL, 'c' },
    { "handshake-timeout-ms", required_argument, NULL, 'H' },
    { "request-timeout-ms", required_argument, NULL, 'R' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 's': disk.size = parse_size (optarg); break;
    case 'l': disk.latency_ms = atol (optarg); break;
    case 'w': workers = atoi (optarg); break;
    case 'r': readonly = 1; break;
    case 'e': export_name = optarg; break;
    case 'm': max_inflight = atol (optarg); break;
    case 'c': max_connections = atol (optarg); break;
    case 'H': handshake_timeout_ms = atol (optarg); break;
    case 'R': request_timeout_ms = atol (optarg); break;
    default: usage ();
    }
  }
  if (optind != argc || workers < 1 || disk.latency_ms < 0 || max_inflight < 0)
    usage ();
  if (!unix_path && !tcp)
    tcp = "127.0.0.1:10809";

  /* calloc maps zero pages lazily: a large disk costs only what is written. */
  disk.data = calloc (1, disk.size);
  if (disk.data == NULL) {
    perror ("memdisk: calloc");
    return EXIT_FAILURE;
  }

  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (srv == NULL)
    return EXIT_FAILURE;
  nbdkit_server_set_readonly (srv, readonly);
  nbdkit_server_set_export_name (srv, export_name);
  nbdkit_server_set_export_description (srv, "in-memory disk (libnbdkit-async example)");
  if (max_inflight > 0)
    nbdkit_server_set_max_inflight (srv, (uint32_t) max_inflight);
  nbdkit_server_set_max_connections (srv, (uint32_t) max_connections);
  if (handshake_timeout_ms >= 0)
    nbdkit_server_set_handshake_timeout_ms (srv, (uint32_t) handshake_timeout_ms);
  nbdkit_server_set_request_timeout_ms (srv, (uint32_t) request_timeout_ms);

  /* Before the URI is printed: whoever reads it may signal us at once. */
  struct sigaction sa = { .sa_handler = on_signal };
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);

  if (unix_path) {
    if (nbdkit_server_listen_unix (srv, unix_path) < 0)
      return EXIT_FAILURE;
    printf ("nbd+unix:///%s?socket=%s\n", export_name, unix_path);
  }
  if (tcp) {
    char host[256];
    const char *colon = strrchr (tcp, ':');
    if (colon == NULL || (size_t) (colon - tcp) >= sizeof host)
      usage ();
    memcpy (host, tcp, colon - tcp);
    host[colon - tcp] = '\0';
    int port = nbdkit_server_listen_tcp (srv, host, (uint16_t) atoi (colon + 1));
    if (port < 0)
      return EXIT_FAILURE;
    printf ("nbd://%s:%d/%s\n", host, port, export_name);
  }
  fflush (stdout);

  pthread_condattr_t attr;
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&disk.queue_cond, &attr);
  pthread_t threads[workers];
  for (int i = 0; i < workers; i++)
    pthread_create (&threads[i], NULL, worker, NULL);

  /* Returns once shutdown was asked and every op in flight is answered. */
  int r = nbdkit_main_loop (srv);

  pthread_mutex_lock (&disk.queue_lock);
  disk.stopping = true;
  pthread_cond_broadcast (&disk.queue_cond);
  pthread_mutex_unlock (&disk.queue_lock);
  for (int i = 0; i < workers; i++)
    pthread_join (threads[i], NULL);

  nbdkit_server_free (srv);
  free (disk.data);
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
