/* memdisk: an in-memory disk served over NBD with the asynchronous API.
 *
 * It plays the high-latency backend: with --latency-ms N every request is
 * queued and finished by a small pool of worker threads once N ms have
 * passed. Thousands of requests can wait at once; no thread is tied to
 * any of them. With a single fixed latency, arrival order is deadline
 * order, so the timer queue is a plain FIFO. With no latency (the
 * default) it is a plain RAM disk and answers inside the callback. Reads
 * of data are lent from the disk's own pages (nbdkit_reply_read_nocopy).
 *
 * Each --export adds a disk of --size bytes under that name (the first is
 * the default export). Disks are sparse: block status and reads report
 * the holes, and trim or zero punch new ones.
 *
 *   build/memdisk [--unix PATH] [--tcp HOST:PORT] [--size N[K|M|G]]
 *                 [--latency-ms N] [--workers N] [--readonly] [--export NAME]...
 *                 [--max-inflight N] [--max-connections N]
 *                 [--handshake-timeout-ms N] [--request-timeout-ms N]
 *                 [--shutdown-grace-ms N] [--max-request-size N[K|M]]
 *                 [--loops N] [--fd N] [--tls=off|on|require] [--tls-certificates DIR]
 *                 [--tls-verify-peer]
 *
 * On SIGINT or SIGTERM it stops taking requests and gives those in flight
 * --shutdown-grace-ms (default 5000) to finish before their clients are
 * answered ESHUTDOWN; -1 waits for every one. --loops N serves clients from
 * N event loops (threads): the callbacks below share only the disks, whose
 * lock and the timer queue's make them safe on any thread.
 *
 * --fd N serves one client already connected on descriptor N (0 when a
 * client starts us over a socketpair) and exits when it leaves. Sockets
 * from systemd socket activation are served too. SIGUSR1 prints stats.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <nbdkit-async.h>

enum kind { READ, WRITE, ZERO, FLUSH, EXTENTS };

#define PAGE 4096               /* allocation is tracked per page */
#define MAX_EXPORTS 16
#define DESCRIPTION "in-memory disk (libnbdkit-async example)"
#define MAX_EXTENTS 1024        /* per block-status reply; clients ask again */

/* One export: sparse memory plus a bitmap of pages written since their
 * last trim, so block status and sparse reads tell data from holes.
 */
struct disk {
  const char *name;
  unsigned char *data;          /* mmap'd: untouched pages cost nothing */
  uint64_t size;
  unsigned char *allocated;     /* one bit per page */
  pthread_rwlock_t lock;        /* readers share, writers exclude */
};

/* One request waiting for its deadline. */
struct job {
  struct job *next;
  nbdkit_op *op;
  struct disk *disk;
  enum kind kind;
  void *buf;
  uint32_t count;
  uint64_t offset;
  uint32_t flags;
  struct timespec due;
};

static struct disk disks[MAX_EXPORTS];
static int ndisks;

static struct {
  long latency_ms;
  pthread_mutex_t lock;
  pthread_cond_t cond;          /* signalled on new work and on stop */
  struct job *head, *tail;
  bool stopping;
} queue = { .lock = PTHREAD_MUTEX_INITIALIZER };

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

static bool
page_allocated (const struct disk *d, uint64_t page)
{
  return d->allocated[page / 8] & (1 << (page % 8));
}

static void
mark_pages (struct disk *d, uint64_t first, uint64_t end, bool allocated)
{
  for (uint64_t p = first; p < end; p++) {
    if (allocated)
      d->allocated[p / 8] |= 1 << (p % 8);
    else
      d->allocated[p / 8] &= ~(1 << (p % 8));
  }
}

/* Zeroes a range; whole pages inside it are given back to the kernel and
 * become holes again.
 */
static void
punch (struct disk *d, uint64_t offset, uint32_t count)
{
  uint64_t end = offset + count;
  uint64_t first = (offset + PAGE - 1) / PAGE, last = end / PAGE;
  if (first >= last) {
    memset (d->data + offset, 0, count);
    return;
  }
  memset (d->data + offset, 0, first * PAGE - offset);
  memset (d->data + last * PAGE, 0, end - last * PAGE);
  madvise (d->data + first * PAGE, (last - first) * PAGE, MADV_DONTNEED);
  mark_pages (d, first, last, false);
}

/* Describes [offset, offset + count) as runs of data and holes, at most
 * max of them. Returns how many it wrote.
 */
static size_t
describe (const struct disk *d, uint64_t offset, uint32_t count,
          nbdkit_extent *out, size_t max)
{
  uint64_t pos = offset, end = offset + count;
  size_t n = 0;
  while (pos < end && n < max) {
    bool data = page_allocated (d, pos / PAGE);
    uint64_t next = pos;
    while (next < end && page_allocated (d, next / PAGE) == data)
      next = (next / PAGE + 1) * PAGE;
    if (next > end)
      next = end;
    out[n++] = (nbdkit_extent) {
      .length = next - pos,
      .type = data ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO,
    };
    pos = next;
  }
  return n;
}

static void
run_job (struct job *j)
{
  struct disk *d = j->disk;
  nbdkit_extent extents[MAX_EXTENTS];
  size_t n;

  switch (j->kind) {
  case READ:
    pthread_rwlock_rdlock (&d->lock);
    n = describe (d, j->offset, j->count, extents, MAX_EXTENTS);
    if (n == 1 && extents[0].type == 0) {
      pthread_rwlock_unlock (&d->lock);
      /* All data: lend the disk's own pages instead of copying them. The
       * mapping outlives the server, so there is nothing to release. A
       * write racing this read may show through, as NBD allows for
       * overlapping requests in flight.
       */
      nbdkit_reply_read_nocopy (j->op, d->data + j->offset, j->count,
                                NULL, NULL);
      break;
    }
    memcpy (j->buf, d->data + j->offset, j->count);
    pthread_rwlock_unlock (&d->lock);
    /* Tell the library where the holes are: they need not cross the wire. */
    if (n == MAX_EXTENTS)       /* too fragmented to describe: all data */
      n = 1, extents[0] = (nbdkit_extent) { .length = j->count };
    nbdkit_reply_read_extents (j->op, extents, n);
    break;
  case WRITE:
    pthread_rwlock_wrlock (&d->lock);
    memcpy (d->data + j->offset, j->buf, j->count);
    mark_pages (d, j->offset / PAGE, (j->offset + j->count + PAGE - 1) / PAGE,
                true);
    pthread_rwlock_unlock (&d->lock);
    nbdkit_reply (j->op);
    break;
  case ZERO:
    pthread_rwlock_wrlock (&d->lock);
    punch (d, j->offset, j->count);
    pthread_rwlock_unlock (&d->lock);
    nbdkit_reply (j->op);
    break;
  case EXTENTS:
    pthread_rwlock_rdlock (&d->lock);
    n = describe (d, j->offset, j->count, extents,
                  j->flags & NBDKIT_FLAG_REQ_ONE ? 1 : MAX_EXTENTS);
    pthread_rwlock_unlock (&d->lock);
    nbdkit_reply_extents (j->op, extents, n);
    break;
  case FLUSH:
    /* RAM is as durable as it gets; the latency was the whole cost. */
    nbdkit_reply (j->op);
    break;
  }
}

/* Called on the event loop thread: queue and return at once. */
static int
submit (nbdkit_op *op, struct disk *d, enum kind kind, void *buf,
        uint32_t count, uint64_t offset, uint32_t flags)
{
  if (queue.latency_ms == 0) {
    /* Nothing to wait for: a RAM disk answers on the spot, inside the
     * callback, and no thread handoff is paid.
     */
    struct job now = { .op = op, .disk = d, .kind = kind, .buf = buf,
                       .count = count, .offset = offset, .flags = flags };
    run_job (&now);
    return 0;
  }
  struct job *j = malloc (sizeof *j);
  if (j == NULL)
    return -1;                  /* errno is ENOMEM: the library replies */
  *j = (struct job) { .op = op, .disk = d, .kind = kind, .buf = buf,
                      .count = count, .offset = offset, .flags = flags,
                      .due = deadline_after_ms (queue.latency_ms) };
  pthread_mutex_lock (&queue.lock);
  if (queue.tail)
    queue.tail->next = j;
  else {
    /* Only a new head changes what the workers wait for: behind it, the
     * job's deadline is later than the one they already sleep until.
     */
    queue.head = j;
    pthread_cond_signal (&queue.cond);
  }
  queue.tail = j;
  pthread_mutex_unlock (&queue.lock);
  return 0;
}

static void *
worker (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&queue.lock);
  for (;;) {
    struct job *j = queue.head;
    if (j == NULL) {
      if (queue.stopping)
        break;
      pthread_cond_wait (&queue.cond, &queue.lock);
    }
    else if (!is_due (&j->due))
      pthread_cond_timedwait (&queue.cond, &queue.lock, &j->due);
    else {
      /* Take every job that is due: one wake-up serves them all, where
       * handing them out one by one woke a peer for each.
       */
      struct job *last = j;
      while (last->next && is_due (&last->next->due))
        last = last->next;
      queue.head = last->next;
      if (queue.head == NULL)
        queue.tail = NULL;
      last->next = NULL;
      pthread_mutex_unlock (&queue.lock);
      while (j) {
        struct job *next = j->next;
        run_job (j);
        free (j);
        j = next;
      }
      pthread_mutex_lock (&queue.lock);
    }
  }
  pthread_mutex_unlock (&queue.lock);
  return NULL;
}

/* The plugin. The handle is the export's disk, shared by every connection
 * to it, so multi-conn is safe.
 */
static void *
md_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly;
  for (int i = 0; i < ndisks; i++)
    if (strcmp (disks[i].name, export_name) == 0)
      return &disks[i];
  errno = ENOENT;
  return NULL;
}

static int
md_list_exports (void *user_data, nbdkit_exports *exports)
{
  (void) user_data;
  for (int i = 0; i < ndisks; i++)
    if (nbdkit_add_export (exports, disks[i].name, DESCRIPTION) < 0)
      return -1;
  return 0;
}

static int64_t md_get_size (void *h) { return ((struct disk *) h)->size; }
static int md_yes (void *h) { (void) h; return 1; }

static int
md_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
          uint32_t flags)
{
  return submit (op, h, READ, buf, count, offset, flags);
}

static int
md_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags)
{
  return submit (op, h, WRITE, (void *) buf, count, offset, flags);
}

static int
md_flush (nbdkit_op *op, void *h, uint32_t flags)
{
  return submit (op, h, FLUSH, NULL, 0, 0, flags);
}

/* Trim and zero both punch holes: zeroing RAM is always fast. */
static int
md_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  return submit (op, h, ZERO, NULL, count, offset, flags);
}

static int
md_extents (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
            uint32_t flags)
{
  return submit (op, h, EXTENTS, NULL, count, offset, flags);
}

static const struct nbdkit_plugin_lowlevel plugin = {
  .name = "memdisk",
  .open = md_open,
  .get_size = md_get_size,
  .can_multi_conn = md_yes,
  .can_fast_zero = md_yes,
  .pread = md_pread,
  .pwrite = md_pwrite,
  .flush = md_flush,
  .trim = md_zero,
  .zero = md_zero,
  .extents = md_extents,
  .list_exports = md_list_exports,
};

/* Signals are taken by one thread with sigwait, so handling them is
 * ordinary code: SIGINT/SIGTERM stop the server, SIGUSR1 prints its stats.
 */
static sigset_t handled_signals;

static void *
signal_thread (void *srv)
{
  for (;;) {
    int sig;
    if (sigwait (&handled_signals, &sig) != 0)
      continue;
    if (sig == SIGUSR1) {
      struct nbdkit_stats st;
      if (nbdkit_server_stats (srv, &st, sizeof st) == 0)
        fprintf (stderr,
                 "memdisk: connections %" PRIu64 " (total %" PRIu64 "), "
                 "in flight %" PRIu64 ", reads %" PRIu64 ", writes %" PRIu64
                 ", bytes read %" PRIu64 ", bytes written %" PRIu64
                 ", errors %" PRIu64 "\n",
                 st.connections, st.connections_total, st.requests_in_flight,
                 st.requests[0], st.requests[1], st.bytes_read,
                 st.bytes_written, st.errors);
      continue;
    }
    nbdkit_server_shutdown (srv);
    return NULL;
  }
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
           " [--export NAME]...\n"
           "               [--max-inflight N] [--max-connections N]\n"
           "               [--handshake-timeout-ms N] [--request-timeout-ms N]\n"
           "               [--shutdown-grace-ms N] [--max-request-size N[K|M]]\n"
           "               [--loops N] [--fd N] [--tls=off|on|require] [--tls-certificates DIR]\n"
           "               [--tls-verify-peer]\n");
  exit (EXIT_FAILURE);
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *tcp = NULL;
  const char *names[MAX_EXPORTS];
  int nnames = 0;
  uint64_t size = 1ULL << 30;
  int workers = 2, readonly = 0;
  long max_inflight = 0, max_connections = 0;
  long handshake_timeout_ms = -1, request_timeout_ms = 0;
  long shutdown_grace_ms = 5000, loops = 1;
  uint64_t max_request_size = 0;
  int client_fd = -1;
  int tls = NBDKIT_TLS_OFF, tls_verify_peer = 0;
  const char *tls_certificates = NULL;

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
    { "shutdown-grace-ms", required_argument, NULL, 'G' },
    { "max-request-size", required_argument, NULL, 'M' },
    { "loops", required_argument, NULL, 'L' },
    { "fd", required_argument, NULL, 'f' },
    { "tls", required_argument, NULL, 'T' },
    { "tls-certificates", required_argument, NULL, 'C' },
    { "tls-verify-peer", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 's': size = parse_size (optarg); break;
    case 'l': queue.latency_ms = atol (optarg); break;
    case 'w': workers = atoi (optarg); break;
    case 'r': readonly = 1; break;
    case 'e':
      if (nnames == MAX_EXPORTS)
        usage ();
      names[nnames++] = optarg;
      break;
    case 'm': max_inflight = atol (optarg); break;
    case 'c': max_connections = atol (optarg); break;
    case 'H': handshake_timeout_ms = atol (optarg); break;
    case 'R': request_timeout_ms = atol (optarg); break;
    case 'G': shutdown_grace_ms = atol (optarg); break;
    case 'M': max_request_size = parse_size (optarg); break;
    case 'L': loops = atol (optarg); break;
    case 'f': client_fd = atoi (optarg); break;
    case 'T':
      if (strcmp (optarg, "off") == 0) tls = NBDKIT_TLS_OFF;
      else if (strcmp (optarg, "on") == 0) tls = NBDKIT_TLS_ALLOW;
      else if (strcmp (optarg, "require") == 0) tls = NBDKIT_TLS_REQUIRE;
      else usage ();
      break;
    case 'C': tls_certificates = optarg; break;
    case 'V': tls_verify_peer = 1; break;
    default: usage ();
    }
  }
  if (optind != argc || workers < 1 || queue.latency_ms < 0 || max_inflight < 0)
    usage ();

  if (nnames == 0)
    names[nnames++] = "";
  for (int i = 0; i < nnames; i++) {
    struct disk *d = &disks[ndisks++];
    d->name = names[i];
    d->size = size;
    /* Anonymous memory is zero and costs nothing until written. */
    d->data = mmap (NULL, size ? size : 1, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    d->allocated = calloc (size / PAGE / 8 + 1, 1);
    if (d->data == MAP_FAILED || d->allocated == NULL) {
      perror ("memdisk: allocating the disk");
      return EXIT_FAILURE;
    }
    pthread_rwlock_init (&d->lock, NULL);
  }
  const char *export_name = disks[0].name;

  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (srv == NULL)
    return EXIT_FAILURE;
  nbdkit_server_set_readonly (srv, readonly);
  nbdkit_server_set_export_name (srv, export_name);
  nbdkit_server_set_export_description (srv, DESCRIPTION);
  if (max_inflight > 0)
    nbdkit_server_set_max_inflight (srv, (uint32_t) max_inflight);
  nbdkit_server_set_max_connections (srv, (uint32_t) max_connections);
  if (handshake_timeout_ms >= 0)
    nbdkit_server_set_handshake_timeout_ms (srv, (uint32_t) handshake_timeout_ms);
  nbdkit_server_set_request_timeout_ms (srv, (uint32_t) request_timeout_ms);
  nbdkit_server_set_shutdown_grace_ms (srv, shutdown_grace_ms);
  if (loops < 1 || nbdkit_server_set_loops (srv, (uint32_t) loops) < 0)
    return EXIT_FAILURE;
  if (max_request_size > UINT32_MAX ||
      (max_request_size > 0 &&
       nbdkit_server_set_max_request_size (srv, (uint32_t) max_request_size) < 0))
    return EXIT_FAILURE;
  if (tls != NBDKIT_TLS_OFF) {
    if (tls_certificates == NULL)
      usage ();
    /* The library has logged which file was refused, and why. */
    if (nbdkit_server_set_tls_certificates (srv, tls_certificates) < 0)
      return EXIT_FAILURE;
    nbdkit_server_set_tls (srv, tls);
    nbdkit_server_set_tls_verify_peer (srv, tls_verify_peer);
  }

  /* Before the URI is printed (whoever reads it may signal us at once) and
   * before any thread starts (they inherit the mask).
   */
  sigemptyset (&handled_signals);
  sigaddset (&handled_signals, SIGINT);
  sigaddset (&handled_signals, SIGTERM);
  sigaddset (&handled_signals, SIGUSR1);
  pthread_sigmask (SIG_BLOCK, &handled_signals, NULL);
  pthread_t signals;
  pthread_create (&signals, NULL, signal_thread, srv);

  /* Sockets from systemd socket activation, and a client already
   * connected on a descriptor, need no address of ours.
   */
  int activated = nbdkit_server_listen_systemd (srv);
  if (activated < 0)
    return EXIT_FAILURE;
  if (client_fd >= 0 && nbdkit_server_serve_fd (srv, client_fd) < 0)
    return EXIT_FAILURE;
  if (!unix_path && !tcp && activated == 0 && client_fd < 0)
    tcp = "127.0.0.1:10809";

  if (unix_path) {
    if (nbdkit_server_listen_unix (srv, unix_path) < 0)
      return EXIT_FAILURE;
    printf ("nbd%s+unix:///%s?socket=%s\n", tls == NBDKIT_TLS_REQUIRE ? "s" : "",
            export_name, unix_path);
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
    printf ("nbd%s://%s:%d/%s\n", tls == NBDKIT_TLS_REQUIRE ? "s" : "",
            host, port, export_name);
  }
  if (unix_path || tcp)
    fflush (stdout);

  pthread_condattr_t attr;
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&queue.cond, &attr);
  pthread_t threads[workers];
  for (int i = 0; i < workers; i++)
    pthread_create (&threads[i], NULL, worker, NULL);

  /* Returns once shutdown was asked and every op in flight is answered. */
  int r = nbdkit_main_loop (srv);

  pthread_mutex_lock (&queue.lock);
  queue.stopping = true;
  pthread_cond_broadcast (&queue.cond);
  pthread_mutex_unlock (&queue.lock);
  for (int i = 0; i < workers; i++)
    pthread_join (threads[i], NULL);

  /* The loop may have ended without a signal (the --fd client left). */
  pthread_kill (signals, SIGTERM);
  pthread_join (signals, NULL);

  nbdkit_server_free (srv);
  for (int i = 0; i < ndisks; i++) {
    munmap (disks[i].data, disks[i].size ? disks[i].size : 1);
    free (disks[i].allocated);
    pthread_rwlock_destroy (&disks[i].lock);
  }
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
