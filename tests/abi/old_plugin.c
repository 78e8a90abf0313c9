/* old_plugin: a plugin compiled against tests/abi/nbdkit-async-v1.h (the
 * older, smaller struct nbdkit_plugin_lowlevel), never against the current
 * header. tests/test_system_library.py links it with the current library
 * and drives it with real clients.
 *
 *   old_plugin SOCKET_PATH
 *
 * The plugin struct is copied to the very end of a page whose successor
 * is PROT_NONE, so a library that read past the size it was given would
 * crash rather than read garbage. A 16 MiB RAM disk: reads answered with
 * nbdkit_reply_read, the rest inline with nbdkit_reply. Prints
 * "sizeof=N" and "ready"; SIGTERM -> nbdkit_shutdown().
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "nbdkit-async-v1.h"

#define SIZE (16 << 20)
static unsigned char disk[SIZE];

static void *o_open (void *ud, int ro, const char *name)
{ (void) ro; (void) name; return ud; }
static int64_t o_size (void *h) { (void) h; return SIZE; }

static int
o_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) h; (void) buf; (void) flags;
  return nbdkit_reply_read (op, disk + offset, count);
}

static int
o_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  memcpy (disk + offset, buf, count);
  return nbdkit_reply (op);
}

static int
o_flush (nbdkit_op *op, void *h, uint32_t flags)
{ (void) h; (void) flags; return nbdkit_reply (op); }

static int
o_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) flags;
  memset (disk + offset, 0, count);
  return nbdkit_reply (op);
}

static void on_signal (int sig) { (void) sig; nbdkit_shutdown (); }

int
main (int argc, char *argv[])
{
  if (argc != 2) {
    fprintf (stderr, "usage: old_plugin SOCKET_PATH\n");
    return 2;
  }
  const struct nbdkit_plugin_lowlevel plugin = {
    .name = "old_plugin",
    .open = o_open,
    .get_size = o_size,
    .pread = o_pread,
    .pwrite = o_pwrite,
    .flush = o_flush,
    .trim = o_zero,
    .zero = o_zero,
  };
  long page = sysconf (_SC_PAGESIZE);
  unsigned char *mem = mmap (NULL, 2 * page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED || mprotect (mem + page, page, PROT_NONE) != 0) {
    perror ("mmap");
    return 1;
  }
  struct nbdkit_plugin_lowlevel *p =
    (void *) (mem + page - sizeof plugin);
  memcpy (p, &plugin, sizeof plugin);

  printf ("sizeof=%zu\n", sizeof plugin);
  nbdkit_server *srv = nbdkit_server_new (p, sizeof plugin, disk);
  if (srv == NULL) {
    fprintf (stderr, "old_plugin: nbdkit_server_new returned NULL\n");
    return 1;
  }
  signal (SIGTERM, on_signal);
  signal (SIGINT, on_signal);
  if (nbdkit_server_listen_unix (srv, argv[1]) < 0)
    return 1;
  printf ("ready\n");
  fflush (stdout);
  int r = nbdkit_main_loop (srv);
  nbdkit_server_free (srv);
  munmap (mem, 2 * page);
  return r == 0 ? 0 : 1;
}
