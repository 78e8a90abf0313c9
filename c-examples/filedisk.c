/* filedisk: a file served over NBD with the synchronous API.
 *
 * Ordinary blocking code: each callback does its pread/pwrite/fallocate
 * and returns. The library runs the callbacks on its worker pool, as many
 * at once as the thread model allows (parallel here: positioned I/O on one
 * shared descriptor needs no locking), and serves every client from its
 * event loop. All connections share the file, so multi-conn is safe.
 *
 *   build/filedisk FILE [--unix PATH] [--tcp HOST:PORT] [--readonly]
 *                       [--threads N]
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

static int fd = -1;
static int64_t size;

static void *
fd_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly; (void) export_name;
  return &fd;
}

static int64_t fd_get_size (void *h) { (void) h; return size; }
static int fd_can_multi_conn (void *h) { (void) h; return 1; }

static int
fd_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  char *p = buf;
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
  (void) h;
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
  (void) h; (void) flags;
  return fdatasync (fd);
}

static int
fd_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  /* The range reads back as zeroes and its blocks are released. */
  return fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    offset, count);
}

static int
fd_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
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

static const struct nbdkit_plugin plugin = {
  .name = "filedisk",
  .open = fd_open,
  .get_size = fd_get_size,
  .can_multi_conn = fd_can_multi_conn,
  .pread = fd_pread,
  .pwrite = fd_pwrite,
  .flush = fd_flush,
  .trim = fd_trim,
  .zero = fd_zero,
  .thread_model = NBDKIT_THREAD_MODEL_PARALLEL,
};

static void on_signal (int sig) { (void) sig; nbdkit_shutdown (); }

static void
usage (void)
{
  fprintf (stderr, "usage: filedisk FILE [--unix PATH] [--tcp HOST:PORT]"
           " [--readonly] [--threads N]\n");
  exit (EXIT_FAILURE);
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *tcp = NULL;
  int readonly = 0, threads = 16;
  static const struct option opts[] = {
    { "unix", required_argument, NULL, 'u' },
    { "tcp", required_argument, NULL, 't' },
    { "readonly", no_argument, NULL, 'r' },
    { "threads", required_argument, NULL, 'T' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp = optarg; break;
    case 'r': readonly = 1; break;
    case 'T': threads = atoi (optarg); break;
    default: usage ();
    }
  }
  if (optind != argc - 1 || threads < 1)
    usage ();
  if (!unix_path && !tcp)
    tcp = "127.0.0.1:10809";

  fd = open (argv[optind], (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  struct stat st;
  if (fd == -1 || fstat (fd, &st) == -1) {
    perror (argv[optind]);
    return EXIT_FAILURE;
  }
  size = st.st_size;

  nbdkit_server *srv = nbdkit_server_new_sync (&plugin, sizeof plugin, NULL);
  if (srv == NULL)
    return EXIT_FAILURE;
  nbdkit_server_set_readonly (srv, readonly);
  nbdkit_server_set_threads (srv, (uint32_t) threads);
  /* On SIGINT/SIGTERM, requests in flight get 5 s before their clients
   * are answered ESHUTDOWN, so a stuck disk cannot hold the exit forever.
   */
  nbdkit_server_set_shutdown_grace_ms (srv, 5000);

  struct sigaction sa = { .sa_handler = on_signal };
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);

  if (unix_path) {
    if (nbdkit_server_listen_unix (srv, unix_path) < 0)
      return EXIT_FAILURE;
    printf ("nbd+unix:///?socket=%s\n", unix_path);
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
    printf ("nbd://%s:%d/\n", host, port);
  }
  fflush (stdout);

  int r = nbdkit_main_loop (srv);
  nbdkit_server_free (srv);     /* joins the worker threads */
  close (fd);
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
