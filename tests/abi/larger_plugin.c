/* larger_plugin: a plugin from the future, compiled with a struct LARGER
 * than the current struct nbdkit_plugin_lowlevel (callbacks appended that
 * this library does not know). tests/test_system_library.py runs it as
 *
 *   larger_plugin nonzero   a future callback is set: nbdkit_server_new
 *                           must refuse (NULL), as the header promises
 *   larger_plugin zero      the extra bytes are all zero: nothing is lost
 *                           by ignoring them, so the server is created
 *
 * and reads "new=NULL" or "new=ok" (plus the sizes) from stdout.
 */
#include <stdio.h>
#include <string.h>

#include <nbdkit-async.h>

struct future_plugin {
  struct nbdkit_plugin_lowlevel current;
  int (*future_callback) (void *handle);
  int (*another_future_callback) (void *handle);
};

static int64_t f_size (void *h) { (void) h; return 1 << 20; }
static int f_future (void *h) { (void) h; return 1; }

static int
f_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) h; (void) offset; (void) flags;
  memset (buf, 0, count);
  return nbdkit_reply (op);
}

int
main (int argc, char *argv[])
{
  if (argc != 2 || (strcmp (argv[1], "zero") && strcmp (argv[1], "nonzero"))) {
    fprintf (stderr, "usage: larger_plugin zero|nonzero\n");
    return 2;
  }
  struct future_plugin p;
  memset (&p, 0, sizeof p);
  p.current.name = "larger_plugin";
  p.current.get_size = f_size;
  p.current.pread = f_pread;
  if (strcmp (argv[1], "nonzero") == 0)
    p.another_future_callback = f_future;

  printf ("current=%zu future=%zu\n", sizeof p.current, sizeof p);
  nbdkit_server *srv = nbdkit_server_new ((const struct nbdkit_plugin_lowlevel *) &p,
                                          sizeof p, NULL);
  printf ("new=%s\n", srv ? "ok" : "NULL");
  nbdkit_server_free (srv);
  return 0;
}
