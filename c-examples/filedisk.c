/* filedisk: files served over NBD with the synchronous API.
 *
 * Ordinary blocking code: each callback does its pread/pwrite/fallocate/
 * lseek and returns. The library runs the callbacks on its worker pool,
 * as many at once as the thread model allows (parallel here: positioned
 * I/O on one shared descriptor needs no locking), and serves every client
 * from its event loop. All connections to a file share its descriptor, so
 * multi-conn is safe.
 *
 *   build/filedisk FILE... [--unix PATH] [--tcp HOST:PORT] [--fd N]
 *                  [--readonly] [--threads N]
 *                  [--request-timeout-ms N] [--shutdown-grace-ms N]
 *                  [--tls=off|on|require] [--tls-certificates DIR]
 *
 * Each FILE is an export named after its last path component; the first
 * is also the default export (""). Block status comes from SEEK_DATA and
 * SEEK_HOLE, so sparse files show their holes; trim punches holes.
 * Sockets from systemd socket activation are served, and --fd N serves a
 * client already connected on descriptor N; with neither, nor --unix or
 * --tcp, it listens on 127.0.0.1:10809.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-async.h>

#define MAX_FILES 64

struct file {
  const char *name;             /* the export's name */
  int fd;
  int64_t size;
};

static struct file files[MAX_FILES];
static int nfiles;

static void *
fd_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly;
  for (int i = 0; i < nfiles; i++)
    if (*export_name == '\0' || strcmp (export_name, files[i].name) == 0)
      return &files[i];
  errno = ENOENT;
  return NULL;
}

static int
fd_list (void *user_data, nbdkit_exports *exports)
{
  (void) user_data;
  for (int i = 0; i < nfiles; i++)
    if (nbdkit_add_export (exports, files[i].name, NULL) < 0)
      return -1;
  return 0;
}

static int64_t fd_get_size (void *h) { return ((struct file *) h)->size; }
static int fd_can_multi_conn (void *h) { (void) h; return 1; }

static int
fd_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  int fd = ((struct file *) h)->fd;
  char *p = buf;
  (void) flags;
  while (count > 0) {
    ssize_t r = pread (fd, p, count, offset);
    if (r == -1)
      return -1;                /* errno is the error */
    if (r == 0) {               /* the file shrank under us */
      nbdkit_set_error (EIO);
      return -1;
    }
    p += r; count -= r; offset += r;
  }
  return 0;
}

static int
fd_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
           uint32_t flags)
{
  int fd = ((struct file *) h)->fd;
  const char *p = buf;
  while (count > 0) {
    ssize_t r = pwrite (fd, p, count, offset);
    if (r == -1)
      return -1;
    p += r; count -= r; offset += r;
  }
  /* NBDKIT_FLAG_FUA only comes with can_fua = NATIVE; we leave FUA to the
   * library, which emulates it with our flush. */
  (void) flags;
  return 0;
}

static int
fd_flush (void *h, uint32_t flags)
{
  (void) flags;
  return fdatasync (((struct file *) h)->fd);
}

static int
fd_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  /* The range reads back as zeroes and its blocks are released. */
  return fallocate (((struct file *) h)->fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count);
}

static int
fd_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  int fd = ((struct file *) h)->fd;
  if (flags & NBDKIT_FLAG_MAY_TRIM &&
      fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 offset, count) == 0)
    return 0;
  if (fallocate (fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 offset, count) == 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != ENOSYS)
    return -1;

  /* The file system cannot do it for us: write zeroes. */
  static const char zeroes[64 * 1024];
  while (count > 0) {
    uint32_t n = count < sizeof zeroes ? count : sizeof zeroes;
    if (fd_pwrite (h, zeroes, n, offset, 0) == -1)
      return -1;
    count -= n; offset += n;
  }
  return 0;
}

/* Allocation from the file system: data up to the next hole, a hole up
 * to the next data, until the request is covered (or one extent is
 * enough). A file system without SEEK_DATA reports everything as data. */
static int
fd_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
            nbdkit_extents_builder *extents)
{
  struct file *f = h;
  uint64_t end = offset + count;
  while (offset < end) {
    off_t data = lseek (f->fd, offset, SEEK_DATA);
    if (data == -1 && errno == ENXIO)
      data = f->size;           /* a hole up to the end of the file */
    else if (data == -1) {     /* no SEEK_DATA here: all data */
      nbdkit_add_extent (extents, offset, end - offset, 0);
      return 0;
    }
    if ((uint64_t) data > offset) {
      nbdkit_add_extent (extents, offset, data - offset,
                         NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
      offset = data;
    }
    else {
      off_t hole = lseek (f->fd, offset, SEEK_HOLE);
      if (hole == -1)
        return -1;
      nbdkit_add_extent (extents, offset, hole - offset, 0);
      offset = hole;
    }
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static const struct nbdkit_plugin plugin = {
  .name = "filedisk",
  .open = fd_open,
  .list_exports = fd_list,
  .get_size = fd_get_size,
  .can_multi_conn = fd_can_multi_conn,
  .pread = fd_pread,
  .pwrite = fd_pwrite,
  .flush = fd_flush,
  .trim = fd_trim,
  .zero = fd_zero,
  .extents = fd_extents,
  .thread_model = NBDKIT_THREAD_MODEL_PARALLEL,
};

static void on_signal (int sig) { (void) sig; nbdkit_shutdown (); }

static void
usage (void)
{
  fprintf (stderr,
           "usage: filedisk FILE... [--unix PATH] [--tcp HOST:PORT] [--fd N]\n"
           "                [--readonly] [--threads N]\n"
           "                [--request-timeout-ms N] [--shutdown-grace-ms N]\n"
           "                [--tls=off|on|require] [--tls-certificates DIR]\n");
  exit (EXIT_FAILURE);
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *tcp = NULL, *tls_certificates = NULL;
  int readonly = 0, threads = 16, client_fd = -1, tls = NBDKIT_TLS_OFF;
  long request_timeout_ms = 0, shutdown_grace_ms = 5000;
  static const struct option opts[] = {
    { "unix", required_argument, NULL, 'u' },
    { "tcp", required_argument, NULL, 't' },
    { "fd", required_argument, NULL, 'f' },
    { "readonly", no_argument, NULL, 'r' },
    { "threads", required_argument, NULL, 'T' },
    { "request-timeout-ms", required_argument, NULL, 'R' },
    { "shutdown-grace-ms", required_argument, NULL, 'G' },
    { "tls", required_argument, NULL, 'S' },
    { "tls-certificates", required_argument, NULL, 'C' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 'f': client_fd = atoi (optarg); break;
    case 'r': readonly = 1; break;
    case 'T': threads = atoi (optarg); break;
    case 'R': request_timeout_ms = atol (optarg); break;
    case 'G': shutdown_grace_ms = atol (optarg); break;
    case 'S':
      if (strcmp (optarg, "off") == 0) tls = NBDKIT_TLS_OFF;
      else if (strcmp (optarg, "on") == 0) tls = NBDKIT_TLS_ALLOW;
      else if (strcmp (optarg, "require") == 0) tls = NBDKIT_TLS_REQUIRE;
      else usage ();
      break;
    case 'C': tls_certificates = optarg; break;
    default: usage ();
    }
  }
  if (optind == argc || argc - optind > MAX_FILES || threads < 1 ||
      request_timeout_ms < 0 || (tls != NBDKIT_TLS_OFF && !tls_certificates))
    usage ();

  for (int i = optind; i < argc; i++) {
    struct file *f = &files[nfiles++];
    const char *slash = strrchr (argv[i], '/');
    f->name = slash ? slash + 1 : argv[i];
    f->fd = open (argv[i], (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    struct stat st;
    if (f->fd == -1 || fstat (f->fd, &st) == -1) {
      perror (argv[i]);
      return EXIT_FAILURE;
    }
    f->size = st.st_size;
  }

  nbdkit_server *srv = nbdkit_server_new_sync (&plugin, sizeof plugin, NULL);
  if (srv == NULL)
    return EXIT_FAILURE;
  nbdkit_server_set_readonly (srv, readonly);
  nbdkit_server_set_threads (srv, (uint32_t) threads);
  nbdkit_server_set_export_name (srv, files[0].name);
  nbdkit_server_set_request_timeout_ms (srv, (uint32_t) request_timeout_ms);
  /* On SIGINT/SIGTERM, requests in flight get this long before their
   * clients are answered ESHUTDOWN, so a stuck disk cannot hold the exit
   * forever. */
  nbdkit_server_set_shutdown_grace_ms (srv, shutdown_grace_ms);
  if (tls != NBDKIT_TLS_OFF) {
    if (nbdkit_server_set_tls_certificates (srv, tls_certificates) < 0)
      return EXIT_FAILURE;      /* the library logged which file, and why */
    nbdkit_server_set_tls (srv, tls);
  }

  struct sigaction sa = { .sa_handler = on_signal };
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);

  int activated = nbdkit_server_listen_systemd (srv);
  if (activated < 0)
    return EXIT_FAILURE;
  if (client_fd >= 0 && nbdkit_server_serve_fd (srv, client_fd) < 0)
    return EXIT_FAILURE;
  if (!unix_path && !tcp && activated == 0 && client_fd < 0)
    tcp = "127.0.0.1:10809";

  const char *s = tls == NBDKIT_TLS_REQUIRE ? "s" : "";
  if (unix_path) {
    if (nbdkit_server_listen_unix (srv, unix_path) < 0)
      return EXIT_FAILURE;
    printf ("nbd%s+unix:///%s?socket=%s\n", s, files[0].name, unix_path);
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
    printf ("nbd%s://%s:%d/%s\n", s, host, port, files[0].name);
  }
  fflush (stdout);

  int r = nbdkit_main_loop (srv);
  /* A worker stuck in a read of a dead disk would hold up the join in
   * nbdkit_server_free: then exit without freeing. */
  struct nbdkit_stats st;
  if (nbdkit_server_stats (srv, &st, sizeof st) == 0 && st.requests_in_flight > 0) {
    fprintf (stderr, "filedisk: %llu requests still running; exiting without waiting\n",
             (unsigned long long) st.requests_in_flight);
    return EXIT_FAILURE;
  }
  nbdkit_server_free (srv);     /* joins the worker threads */
  for (int i = 0; i < nfiles; i++)
    close (files[i].fd);
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
