/* rbd-gateway: serves the images of a Ceph RBD pool over NBD with
 * libnbdkit-async and librbd's asynchronous API.
 *
 *   build/rbd-gateway --pool POOL [--image NAME] [--conf FILE] [--id USER]
 *                     [--unix PATH] [--tcp HOST:PORT] [--readonly]
 *                     [--request-timeout-ms N] [--shutdown-grace-ms N]
 *                     [--tls=off|on|require] [--tls-certificates DIR]
 *
 * Every image of the pool is an export (NBD_OPT_LIST lists them); --image
 * names the default export. "IMAGE@SNAP" serves a snapshot, read-only.
 *
 * Each request starts a librbd aio call and returns; librbd's completion
 * callback, on one of librbd's threads, answers it with nbdkit_reply.
 * Reads land straight in the buffer the library handed to pread, writes
 * go out from the buffer it received: no copy on our side. Block status
 * comes from rbd_diff_iterate2, which blocks, so it runs on a thread of
 * our own. Threads of ours: the event loop (main), that one, and the
 * signal thread; the rest are librbd's.
 *
 * Durability. With librbd's cache off, a write completes once every
 * replica has it in its journal, so it is durable when answered. With
 * the writeback cache on (`rbd cache = true`), a write completes from the
 * cache and rbd_aio_flush writes the cache back. So flush is
 * rbd_aio_flush, and FUA is left to the library (NBDKIT_FUA_EMULATE: it
 * flushes after the write and answers after the flush): both are true
 * whichever the cache setting.
 *
 * Multi-conn: every connection to one image (or snapshot) shares one
 * open rbd_image_t, so a flush on any connection flushes the writes of
 * all of them, and CAN_MULTI_CONN is advertised truthfully.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <nbdkit-async.h>

#define MAX_EXTENTS 1024        /* per block-status reply; clients ask again */

static rados_t cluster;
static rados_ioctx_t pool_io;
static const char *pool_name;
static int server_readonly;

/* ------------------------------------------------------------ images */

/* One open image or snapshot, shared by every connection to it. Only the
 * loop thread opens and closes them (open, close), so the list needs no
 * lock; I/O threads reach an image only through an op they hold.
 */
struct image {
  struct image *next;
  char *name;                   /* as the client named it: "img" or "img@snap" */
  rbd_image_t rbd;
  uint64_t size;
  uint64_t object_size;
  bool readonly;
  int refs;
};

static struct image *images;

/* Ops handed to librbd and not yet completed: shutdown waits for them,
 * since librbd writes into buffers the library owns until then. */
static atomic_long in_librbd;
static pthread_mutex_t drained_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t drained = PTHREAD_COND_INITIALIZER;

static void *
g_open (void *ud, int readonly, const char *name)
{
  (void) ud;
  for (struct image *i = images; i != NULL; i = i->next)
    if (strcmp (i->name, name) == 0) {
      i->refs++;
      return i;
    }
  if (*name == '\0') {
    errno = ENOENT;             /* no --image: no default export */
    return NULL;
  }
  struct image *img = calloc (1, sizeof *img);
  char *image_name = strdup (name);
  if (img == NULL || image_name == NULL) {
    free (img);
    free (image_name);
    errno = ENOMEM;
    return NULL;
  }
  char *snap = strchr (image_name, '@');
  if (snap != NULL)
    *snap++ = '\0';
  img->readonly = readonly || snap != NULL;
  int r = img->readonly
    ? rbd_open_read_only (pool_io, image_name, &img->rbd, snap)
    : rbd_open (pool_io, image_name, &img->rbd, NULL);
  rbd_image_info_t info;
  if (r == 0 && (r = rbd_stat (img->rbd, &info, sizeof info)) < 0)
    rbd_close (img->rbd);
  free (image_name);
  if (r < 0) {
    free (img);
    errno = -r;                 /* ENOENT: no such image; others: the cluster's */
    return NULL;
  }
  img->name = strdup (name);
  img->size = info.size;
  img->object_size = info.obj_size;
  img->refs = 1;
  img->next = images;
  images = img;
  return img;
}

static void
g_close (void *h)
{
  struct image *img = h;
  if (--img->refs > 0)
    return;
  for (struct image **p = &images; *p != NULL; p = &(*p)->next)
    if (*p == img) {
      *p = img->next;
      break;
    }
  rbd_close (img->rbd);
  free (img->name);
  free (img);
}

static int64_t g_size (void *h) { return ((struct image *) h)->size; }
static int g_can_write (void *h) { return !((struct image *) h)->readonly; }
static int g_can_fua (void *h) { (void) h; return NBDKIT_FUA_EMULATE; }
static int g_can_multi_conn (void *h) { (void) h; return 1; }
static int g_can_fast_zero (void *h) { (void) h; return 1; }

static int
g_list (void *ud, nbdkit_exports *exports)
{
  (void) ud;
  size_t n = 64;
  rbd_image_spec_t *specs = NULL;
  int r;
  for (;;) {
    specs = calloc (n, sizeof *specs);
    if (specs == NULL)
      return -1;
    r = rbd_list2 (pool_io, specs, &n);   /* -ERANGE: n says how many */
    if (r != -ERANGE)
      break;
    free (specs);
  }
  if (r < 0) {
    free (specs);
    errno = -r;
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    nbdkit_add_export (exports, specs[i].name, NULL);
  rbd_image_spec_list_cleanup (specs, n);
  free (specs);
  return 0;
}

/* ------------------------------------------------------------ I/O */

/* librbd's completion callback, on a librbd thread: the op goes back to
 * the client from here. */
static void
done (rbd_completion_t c, void *op)
{
  ssize_t r = rbd_aio_get_return_value (c);
  rbd_aio_release (c);
  if (r < 0)
    nbdkit_reply_error (op, (int) -r);
  else
    nbdkit_reply (op);
  if (atomic_fetch_sub (&in_librbd, 1) == 1) {
    pthread_mutex_lock (&drained_lock);
    pthread_cond_broadcast (&drained);
    pthread_mutex_unlock (&drained_lock);
  }
}

/* A completion whose callback answers `op`, or NULL. */
static rbd_completion_t
completion (nbdkit_op *op)
{
  rbd_completion_t c;
  if (rbd_aio_create_completion (op, done, &c) < 0)
    return NULL;
  atomic_fetch_add (&in_librbd, 1);
  return c;
}

/* What an I/O callback returns once librbd said `r` to starting `c`: 0
 * (librbd answers through `done`) or librbd's -errno (failed at once). */
static int
started (int r, rbd_completion_t c)
{
  if (r < 0) {
    atomic_fetch_sub (&in_librbd, 1);
    rbd_aio_release (c);
  }
  return r;
}

static rbd_image_t rbd (void *h) { return ((struct image *) h)->rbd; }

static int
g_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) flags;
  rbd_completion_t c = completion (op);
  return c ? started (rbd_aio_read (rbd (h), offset, count, buf, c), c) : -ENOMEM;
}

static int
g_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{
  (void) flags;
  rbd_completion_t c = completion (op);
  return c ? started (rbd_aio_write (rbd (h), offset, count, buf, c), c) : -ENOMEM;
}

static int
g_flush (nbdkit_op *op, void *h, uint32_t flags)
{
  (void) flags;
  rbd_completion_t c = completion (op);
  return c ? started (rbd_aio_flush (rbd (h), c), c) : -ENOMEM;
}

static int
g_trim (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  rbd_completion_t c = completion (op);
  return c ? started (rbd_aio_discard (rbd (h), offset, count, c), c) : -ENOMEM;
}

static int
g_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct image *img = h;
  /* Whole objects are zeroed by removing them (when holes are allowed):
   * fast. Part of an object, or a client that forbids holes, means
   * writing zeroes, which a FAST_ZERO client does not want. */
  if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
      (!(flags & NBDKIT_FLAG_MAY_TRIM) ||     /* NO_HOLE: must write zeroes */
       offset % img->object_size != 0 || count % img->object_size != 0))
    return -ENOTSUP;
  int zero_flags = (flags & NBDKIT_FLAG_MAY_TRIM) ? 0
                   : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
  rbd_completion_t c = completion (op);
  return c ? started (rbd_aio_write_zeroes (img->rbd, offset, count, c,
                                            zero_flags, 0), c)
           : -ENOMEM;
}

/* ------------------------------------------------------------ block status */

/* rbd_diff_iterate2 blocks (it may read the object map, or list objects),
 * so block-status requests queue up for one thread of ours. */
struct extents_job {
  struct extents_job *next;
  nbdkit_op *op;
  struct image *img;            /* the connection holds it until the reply */
  uint64_t offset;
  uint32_t count;
};

static struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct extents_job *head, **tail;
  bool stopping;
} ext = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, &ext.head, false };

struct extents_acc {
  struct nbdkit_extent e[MAX_EXTENTS];
  size_t n;
  uint64_t pos;                 /* end of what is described so far */
  uint64_t end;
};

static void
add_extent (struct extents_acc *a, uint64_t len, uint32_t type)
{
  if (len == 0 || a->n == MAX_EXTENTS)
    return;
  if (a->n > 0 && a->e[a->n - 1].type == type)
    a->e[a->n - 1].length += len;
  else
    a->e[a->n++] = (struct nbdkit_extent) { .length = len, .type = type };
  a->pos += len;
}

/* Called for each allocated range, in order; what lies between is a hole. */
static int
allocated (uint64_t off, size_t len, int exists, void *arg)
{
  struct extents_acc *a = arg;
  if (off > a->pos)
    add_extent (a, off - a->pos, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
  add_extent (a, len, exists ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
  return a->n == MAX_EXTENTS ? -EINTR : 0;   /* enough: stop early */
}

static void *
extents_worker (void *arg)
{
  (void) arg;
  struct extents_acc *a = malloc (sizeof *a);
  if (a == NULL)
    abort ();
  for (;;) {
    pthread_mutex_lock (&ext.lock);
    while (ext.head == NULL && !ext.stopping)
      pthread_cond_wait (&ext.cond, &ext.lock);
    struct extents_job *j = ext.head;
    if (j == NULL) {
      pthread_mutex_unlock (&ext.lock);
      break;
    }
    if ((ext.head = j->next) == NULL)
      ext.tail = &ext.head;
    bool stopping = ext.stopping;
    if (!stopping)
      atomic_fetch_add (&in_librbd, 1);   /* shutdown waits for it */
    pthread_mutex_unlock (&ext.lock);
    if (stopping) {             /* the cluster may be gone: do not ask it */
      nbdkit_reply_error (j->op, ESHUTDOWN);
      free (j);
      continue;
    }

    a->n = 0;
    a->pos = j->offset;
    a->end = j->offset + j->count;
    int r = rbd_diff_iterate2 (j->img->rbd, NULL, j->offset, j->count,
                               1 /* include parent */, 0, allocated, a);
    if (r < 0 && r != -EINTR)
      nbdkit_reply_error (j->op, -r);
    else {
      if (r == 0 && a->pos < a->end)
        add_extent (a, a->end - a->pos, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
      nbdkit_reply_extents (j->op, a->e, a->n);
    }
    free (j);
    if (atomic_fetch_sub (&in_librbd, 1) == 1) {
      pthread_mutex_lock (&drained_lock);
      pthread_cond_broadcast (&drained);
      pthread_mutex_unlock (&drained_lock);
    }
  }
  free (a);
  return NULL;
}

static int
g_extents (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
           uint32_t flags)
{
  struct extents_job *j = malloc (sizeof *j);
  if (j == NULL)
    return -ENOMEM;
  (void) flags;                 /* REQ_ONE: the library keeps the first extent */
  *j = (struct extents_job) { .op = op, .img = h, .offset = offset, .count = count };
  pthread_mutex_lock (&ext.lock);
  *ext.tail = j;
  ext.tail = &j->next;
  pthread_cond_signal (&ext.cond);
  pthread_mutex_unlock (&ext.lock);
  return 0;
}

static struct nbdkit_plugin_lowlevel plugin = {
  .name = "rbd-gateway",
  .open = g_open,
  .close = g_close,
  .get_size = g_size,
  .can_write = g_can_write,
  .can_fua = g_can_fua,
  .can_multi_conn = g_can_multi_conn,
  .can_fast_zero = g_can_fast_zero,
  .pread = g_pread,
  .pwrite = g_pwrite,
  .flush = g_flush,
  .trim = g_trim,
  .zero = g_zero,
  .extents = g_extents,
  .list_exports = g_list,
};

/* ------------------------------------------------------------ main */

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
        fprintf (stderr, "rbd-gateway: connections %" PRIu64 ", in flight %"
                 PRIu64 ", reads %" PRIu64 ", writes %" PRIu64 ", errors %"
                 PRIu64 "\n", st.connections, st.requests_in_flight,
                 st.requests[0], st.requests[1], st.errors);
      continue;
    }
    nbdkit_server_shutdown (srv);
    return NULL;
  }
}

static void
usage (void)
{
  fprintf (stderr,
           "usage: rbd-gateway --pool POOL [--image NAME] [--conf FILE] [--id USER]\n"
           "                   [--unix PATH] [--tcp HOST:PORT] [--readonly]\n"
           "                   [--request-timeout-ms N] [--shutdown-grace-ms N]\n"
           "                   [--tls=off|on|require] [--tls-certificates DIR]\n");
  exit (EXIT_FAILURE);
}

static int
connect_cluster (const char *conf, const char *id)
{
  int r = rados_create (&cluster, id);
  if (r == 0)
    r = rados_conf_read_file (cluster, conf);   /* NULL: the usual places */
  if (r == 0)
    r = rados_conf_parse_env (cluster, NULL);   /* CEPH_ARGS */
  if (r == 0)
    r = rados_connect (cluster);
  if (r == 0)
    r = rados_ioctx_create (cluster, pool_name, &pool_io);
  if (r < 0)
    fprintf (stderr, "rbd-gateway: cannot reach pool %s: %s\n", pool_name,
             strerror (-r));
  return r;
}

int
main (int argc, char *argv[])
{
  const char *image = "", *conf = NULL, *id = NULL;
  const char *unix_path = NULL, *tcp = NULL, *tls_certificates = NULL;
  long request_timeout_ms = 0, shutdown_grace_ms = 5000;
  int tls = NBDKIT_TLS_OFF;

  static const struct option opts[] = {
    { "pool", required_argument, NULL, 'p' },
    { "image", required_argument, NULL, 'i' },
    { "conf", required_argument, NULL, 'c' },
    { "id", required_argument, NULL, 'I' },
    { "unix", required_argument, NULL, 'u' },
    { "tcp", required_argument, NULL, 't' },
    { "readonly", no_argument, NULL, 'r' },
    { "request-timeout-ms", required_argument, NULL, 'R' },
    { "shutdown-grace-ms", required_argument, NULL, 'G' },
    { "tls", required_argument, NULL, 'T' },
    { "tls-certificates", required_argument, NULL, 'C' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'p': pool_name = optarg; break;
    case 'i': image = optarg; break;
    case 'c': conf = optarg; break;
    case 'I': id = optarg; break;
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 'r': server_readonly = 1; break;
    case 'R': request_timeout_ms = atol (optarg); break;
    case 'G': shutdown_grace_ms = atol (optarg); break;
    case 'T':
      if (strcmp (optarg, "off") == 0) tls = NBDKIT_TLS_OFF;
      else if (strcmp (optarg, "on") == 0) tls = NBDKIT_TLS_ALLOW;
      else if (strcmp (optarg, "require") == 0) tls = NBDKIT_TLS_REQUIRE;
      else usage ();
      break;
    case 'C': tls_certificates = optarg; break;
    default: usage ();
    }
  }
  if (optind != argc || pool_name == NULL || request_timeout_ms < 0 ||
      (tls != NBDKIT_TLS_OFF && tls_certificates == NULL))
    usage ();
  if (!unix_path && !tcp)
    tcp = "127.0.0.1:10809";

  /* Before any thread starts, librados's included: the signal thread
   * alone takes these, with sigwait. */
  sigemptyset (&handled_signals);
  sigaddset (&handled_signals, SIGINT);
  sigaddset (&handled_signals, SIGTERM);
  sigaddset (&handled_signals, SIGUSR1);
  pthread_sigmask (SIG_BLOCK, &handled_signals, NULL);

  if (connect_cluster (conf, id) < 0)
    return EXIT_FAILURE;

  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (srv == NULL)
    return EXIT_FAILURE;
  nbdkit_server_set_readonly (srv, server_readonly);
  nbdkit_server_set_export_name (srv, image);
  nbdkit_server_set_request_timeout_ms (srv, (uint32_t) request_timeout_ms);
  nbdkit_server_set_shutdown_grace_ms (srv, shutdown_grace_ms);
  if (tls != NBDKIT_TLS_OFF) {
    if (nbdkit_server_set_tls_certificates (srv, tls_certificates) < 0)
      return EXIT_FAILURE;      /* the library logged which file, and why */
    nbdkit_server_set_tls (srv, tls);
  }

  pthread_t signals, extents;
  pthread_create (&signals, NULL, signal_thread, srv);
  pthread_create (&extents, NULL, extents_worker, NULL);

  const char *s = tls == NBDKIT_TLS_REQUIRE ? "s" : "";
  if (unix_path) {
    if (nbdkit_server_listen_unix (srv, unix_path) < 0)
      return EXIT_FAILURE;
    printf ("nbd%s+unix:///%s?socket=%s\n", s, image, unix_path);
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
    printf ("nbd%s://%s:%d/%s\n", s, host, port, image);
  }
  fflush (stdout);

  int r = nbdkit_main_loop (srv);

  /* Block-status jobs still queued are answered ESHUTDOWN without asking
   * the cluster; one already running counts in in_librbd. */
  pthread_mutex_lock (&ext.lock);
  ext.stopping = true;
  pthread_cond_broadcast (&ext.cond);
  pthread_mutex_unlock (&ext.lock);
  pthread_kill (signals, SIGTERM);
  pthread_join (signals, NULL);

  /* Requests still inside librbd (the grace period passed) write into
   * buffers the server owns: wait for them, at most 30 s, before freeing
   * it. If the cluster never answers, leave everything allocated and
   * exit. */
  struct timespec until;
  clock_gettime (CLOCK_REALTIME, &until);
  until.tv_sec += 30;
  pthread_mutex_lock (&drained_lock);
  while (atomic_load (&in_librbd) > 0 &&
         pthread_cond_timedwait (&drained, &drained_lock, &until) == 0)
    ;
  long left = atomic_load (&in_librbd);
  pthread_mutex_unlock (&drained_lock);
  if (left > 0) {
    fprintf (stderr, "rbd-gateway: %ld requests still in librbd; exiting without "
             "releasing their buffers\n", left);
    return EXIT_FAILURE;
  }
  pthread_join (extents, NULL);   /* idle now: it sees stopping and ends */
  nbdkit_server_free (srv);     /* closes the images still open */
  rados_ioctx_destroy (pool_io);
  rados_shutdown (cluster);
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
