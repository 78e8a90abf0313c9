/* features_harness: a plugin + server for tests/test_protocol_features.py.
 *
 * It emulates what build/memdisk cannot: plugins that misbehave in block
 * status and sparse reads, block size constraints, FAST_ZERO refused with
 * ENOTSUP, and a description per export. Every behaviour is an export,
 * chosen by the name the client asks for, so one server covers them all:
 *
 *   good              [0, 1 MiB) data, the rest a hole reading as zeroes;
 *                     extents reported correctly
 *   past-end          one data extent running 1 GiB past the export end
 *   huge              one data extent of UINT64_MAX bytes
 *   exact4g           one data extent of exactly 2^32 bytes
 *   zero-length       0-byte extents mixed in with valid ones
 *   only-zero-length  nothing but 0-byte extents
 *   none              nbdkit_reply_extents with n = 0
 *   null              nbdkit_reply_extents with NULL and n = 5
 *   more              4 KiB extents covering 1 MiB more than requested
 *   tiny-100000       100000 one-byte extents, alternating data/hole
 *   tiny-2000000      2000000 one-byte extents, alternating data/hole
 *   types             extents whose type has undefined bits set
 *   fail              the extents callback returns -1 with errno EIO
 *   bs512             block_size 512 / 4096 / 64 KiB; good extents
 *   fastzero-enotsup  can_fast_zero = 1, zero with NBDKIT_FLAG_FAST_ZERO
 *                     answers ENOTSUP; zero without it succeeds
 *   badread           reads answered by nbdkit_reply_read_extents whose
 *                     extents cover one byte less than the read
 *   read-wrap         reads answered with extents whose lengths overflow
 *                     u64 and wrap around to exactly the read's count
 *
 * The default export ("") is "good". Every export has the description
 * "features harness: NAME". Reads return byte (offset % 251) + 1 inside
 * [0, 1 MiB) and zeroes elsewhere; writes, trims and zeroes are accepted
 * and forgotten. Every op is answered inline, from its callback.
 *
 *   features_harness --unix PATH [--size BYTES]
 *
 * stdout: "ready" once listening, "open NAME" / "close NAME" per handle,
 * "extents NAME OFFSET COUNT FLAGS" per block-status op, "zero NAME FLAGS"
 * per zero op, "main_loop returned R" at the end. Self-check failures go
 * to stderr as "HARNESS-ERROR".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-async.h>

#include "harness.h"

#define DATA_END (1ULL << 20)

enum mode {
  GOOD, PAST_END, HUGE, EXACT4G, ZERO_LENGTH, ONLY_ZERO_LENGTH, NONE, NUL,
  MORE, TINY_100K, TINY_2M, TYPES, FAIL, BS512, FASTZERO_ENOTSUP, BADREAD,
  READ_WRAP,
};

static const struct export {
  const char *name;
  enum mode mode;
  const char *description;
} exports[] = {
  { "good", GOOD, "features harness: good" },
  { "past-end", PAST_END, "features harness: past-end" },
  { "huge", HUGE, "features harness: huge" },
  { "exact4g", EXACT4G, "features harness: exact4g" },
  { "zero-length", ZERO_LENGTH, "features harness: zero-length" },
  { "only-zero-length", ONLY_ZERO_LENGTH, "features harness: only-zero-length" },
  { "none", NONE, "features harness: none" },
  { "null", NUL, "features harness: null" },
  { "more", MORE, "features harness: more" },
  { "tiny-100000", TINY_100K, "features harness: tiny-100000" },
  { "tiny-2000000", TINY_2M, "features harness: tiny-2000000" },
  { "types", TYPES, "features harness: types" },
  { "fail", FAIL, "features harness: fail" },
  { "bs512", BS512, "features harness: bs512" },
  { "fastzero-enotsup", FASTZERO_ENOTSUP, "features harness: fastzero-enotsup" },
  { "badread", BADREAD, "features harness: badread" },
  { "read-wrap", READ_WRAP, "features harness: read-wrap" },
};
#define NEXPORTS (sizeof exports / sizeof exports[0])

static uint64_t disk_size = 5ULL << 30;

struct handle {
  const struct export *e;
};

static void
check_reply (int r, const char *what)
{
  if (r != 0)
    harness_error ("%s returned %d", what, r);
}

/* bs512: the library must refuse misaligned requests before we see them. */
static void
check_aligned (const struct handle *h, uint64_t offset, uint32_t count,
               uint32_t max)
{
  if (h->e->mode != BS512)
    return;
  if (offset % 512 != 0 || count % 512 != 0 || (max && count > max))
    harness_error ("misaligned request reached the plugin: offset %llu count %u",
                   (unsigned long long) offset, count);
}

static void *
fh_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly;
  const char *name = export_name[0] ? export_name : "good";
  for (size_t i = 0; i < NEXPORTS; i++) {
    if (strcmp (exports[i].name, name) == 0) {
      struct handle *h = malloc (sizeof *h);
      if (h == NULL)
        return NULL;
      h->e = &exports[i];
      printf ("open %s\n", h->e->name);
      fflush (stdout);
      return h;
    }
  }
  errno = ENOENT;
  return NULL;
}

static void
fh_close (void *hv)
{
  struct handle *h = hv;
  printf ("close %s\n", h->e->name);
  fflush (stdout);
  free (h);
}

static int
fh_list_exports (void *user_data, nbdkit_exports *list)
{
  (void) user_data;
  for (size_t i = 0; i < NEXPORTS; i++)
    if (nbdkit_add_export (list, exports[i].name, exports[i].description) != 0) {
      harness_error ("nbdkit_add_export failed");
      return -1;
    }
  return 0;
}

static const char *
fh_export_description (void *hv)
{
  return ((struct handle *) hv)->e->description;
}

static int64_t fh_get_size (void *hv) { (void) hv; return (int64_t) disk_size; }
static int fh_yes (void *hv) { (void) hv; return 1; }

static int
fh_can_fast_zero (void *hv)
{
  return ((struct handle *) hv)->e->mode == FASTZERO_ENOTSUP;
}

static int
fh_block_size (void *hv, uint32_t *minimum, uint32_t *preferred,
               uint32_t *maximum)
{
  if (((struct handle *) hv)->e->mode == BS512) {
    *minimum = 512;
    *preferred = 4096;
    *maximum = 65536;
  }
  else {
    *minimum = 1;
    *preferred = 4096;
    *maximum = 32 << 20;
  }
  return 0;
}

static int
fh_pread (nbdkit_op *op, void *hv, void *buf, uint32_t count, uint64_t offset,
          uint32_t flags)
{
  struct handle *h = hv;
  unsigned char *p = buf;
  (void) flags;
  check_aligned (h, offset, count, 65536);
  for (uint32_t i = 0; i < count; i++) {
    uint64_t off = offset + i;
    p[i] = off < DATA_END ? (unsigned char) (off % 251 + 1) : 0;
  }
  if (h->e->mode == BADREAD) {
    nbdkit_extent e[2] = { { .length = count / 2, .type = 0 },
                           { .length = count - count / 2 - 1,
                             .type = NBDKIT_EXTENT_ZERO } };
    /* The library answers EIO; the call itself still succeeds. */
    check_reply (nbdkit_reply_read_extents (op, e, 2), "reply_read_extents");
    return 0;
  }
  if (h->e->mode == READ_WRAP) {
    nbdkit_extent e[2] = { { .length = 1ULL << 63, .type = NBDKIT_EXTENT_ZERO },
                           { .length = (1ULL << 63) + count, .type = 0 } };
    check_reply (nbdkit_reply_read_extents (op, e, 2), "reply_read_extents");
    return 0;
  }
  check_reply (nbdkit_reply (op), "reply");
  return 0;
}

static int
fh_pwrite (nbdkit_op *op, void *hv, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags)
{
  (void) buf; (void) flags;
  check_aligned (hv, offset, count, 65536);
  check_reply (nbdkit_reply (op), "reply");
  return 0;
}

static int
fh_flush (nbdkit_op *op, void *hv, uint32_t flags)
{
  (void) hv; (void) flags;
  check_reply (nbdkit_reply (op), "reply");
  return 0;
}

static int
fh_trim (nbdkit_op *op, void *hv, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  (void) flags;
  check_aligned (hv, offset, count, 0);
  check_reply (nbdkit_reply (op), "reply");
  return 0;
}

static int
fh_zero (nbdkit_op *op, void *hv, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  struct handle *h = hv;
  check_aligned (h, offset, count, 0);
  printf ("zero %s %u\n", h->e->name, flags);
  fflush (stdout);
  if ((flags & NBDKIT_FLAG_FAST_ZERO) && h->e->mode != FASTZERO_ENOTSUP)
    harness_error ("NBDKIT_FLAG_FAST_ZERO passed to an export without can_fast_zero");
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    check_reply (nbdkit_reply_error (op, ENOTSUP), "reply_error");
  else
    check_reply (nbdkit_reply (op), "reply");
  return 0;
}

/* The correct map: [0, DATA_END) data, the rest a hole, from offset. */
static size_t
good_extents (uint64_t offset, uint32_t count, nbdkit_extent *out)
{
  size_t n = 0;
  uint64_t end = offset + count;
  if (offset < DATA_END) {
    uint64_t stop = end < DATA_END ? end : DATA_END;
    out[n++] = (nbdkit_extent) { .length = stop - offset, .type = 0 };
    offset = stop;
  }
  if (offset < end)
    out[n++] = (nbdkit_extent) { .length = end - offset,
                                 .type = NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO };
  return n;
}

static int
tiny (nbdkit_op *op, size_t n)
{
  nbdkit_extent *e = malloc (n * sizeof *e);
  if (e == NULL)
    return -1;
  for (size_t i = 0; i < n; i++)
    e[i] = (nbdkit_extent) { .length = 1,
                             .type = i % 2 ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0 };
  int r = nbdkit_reply_extents (op, e, n);
  free (e);
  check_reply (r, "reply_extents");
  return 0;
}

static int
fh_extents (nbdkit_op *op, void *hv, uint32_t count, uint64_t offset,
            uint32_t flags)
{
  struct handle *h = hv;
  nbdkit_extent e[8];
  size_t n = 0;

  printf ("extents %s %llu %u %u\n", h->e->name,
          (unsigned long long) offset, count, flags);
  fflush (stdout);
  if (count == 0 || offset + count > disk_size)
    harness_error ("extents request outside the export reached the plugin");
  check_aligned (h, offset, count, 0);

  switch (h->e->mode) {
  case GOOD: case BS512: case FASTZERO_ENOTSUP: case BADREAD: case READ_WRAP:
    n = good_extents (offset, count, e);
    break;
  case PAST_END:
    e[n++] = (nbdkit_extent) { .length = disk_size - offset + (1ULL << 30) };
    break;
  case HUGE:
    e[n++] = (nbdkit_extent) { .length = UINT64_MAX };
    break;
  case EXACT4G:
    e[n++] = (nbdkit_extent) { .length = 1ULL << 32 };
    break;
  case ZERO_LENGTH: {
    nbdkit_extent good[2];
    size_t g = good_extents (offset, count, good);
    e[n++] = (nbdkit_extent) { .length = 0, .type = NBDKIT_EXTENT_HOLE };
    e[n++] = good[0];
    e[n++] = (nbdkit_extent) { .length = 0, .type = 0 };
    if (g > 1)
      e[n++] = good[1];
    e[n++] = (nbdkit_extent) { .length = 0, .type = NBDKIT_EXTENT_ZERO };
    break;
  }
  case ONLY_ZERO_LENGTH:
    for (n = 0; n < 4; n++)
      e[n] = (nbdkit_extent) { .length = 0, .type = n % 2 };
    break;
  case NONE:
    check_reply (nbdkit_reply_extents (op, e, 0), "reply_extents");
    return 0;
  case NUL:
    check_reply (nbdkit_reply_extents (op, NULL, 5), "reply_extents");
    return 0;
  case MORE: {
    uint64_t want = (uint64_t) count + (1 << 20);
    size_t m = (size_t) ((want + 4095) / 4096);
    if (m > 200000)
      m = 200000;
    nbdkit_extent *many = malloc (m * sizeof *many);
    if (many == NULL)
      return -1;
    for (size_t i = 0; i < m; i++)
      many[i] = (nbdkit_extent) { .length = 4096,
                                  .type = i % 2 ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0 };
    int r = nbdkit_reply_extents (op, many, m);
    free (many);
    check_reply (r, "reply_extents");
    return 0;
  }
  case TINY_100K:
    return tiny (op, 100000);
  case TINY_2M:
    return tiny (op, 2000000);
  case TYPES:
    e[n++] = (nbdkit_extent) { .length = count / 2 ? count / 2 : 1,
                               .type = 0xfffffffcu };
    e[n++] = (nbdkit_extent) { .length = count, .type = 0xffffffffu };
    break;
  case FAIL:
    errno = EIO;
    return -1;
  }
  check_reply (nbdkit_reply_extents (op, e, n), "reply_extents");
  return 0;
}

static const struct nbdkit_plugin_lowlevel plugin = {
  .name = "features_harness",
  .open = fh_open,
  .close = fh_close,
  .get_size = fh_get_size,
  .can_multi_conn = fh_yes,
  .pread = fh_pread,
  .pwrite = fh_pwrite,
  .flush = fh_flush,
  .trim = fh_trim,
  .zero = fh_zero,
  .extents = fh_extents,
  .can_fast_zero = fh_can_fast_zero,
  .block_size = fh_block_size,
  .list_exports = fh_list_exports,
  .export_description = fh_export_description,
};

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL;
  const struct harness_opt opts[] = {
    { "--unix", HARNESS_STRING, &unix_path, NULL },
    { "--size", HARNESS_SIZE, &disk_size, NULL },
    { NULL, 0, NULL, NULL },
  };
  static const char usage[] = "--unix PATH [--size BYTES]";

  harness_init ("features_harness");
  harness_parse (argc, argv, opts, usage);
  if (unix_path == NULL)
    harness_usage (usage);

  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (srv == NULL) {
    harness_error ("nbdkit_server_new failed");
    return 1;
  }
  check_reply (nbdkit_server_set_export_name (srv, "good"), "set_export_name");
  check_reply (nbdkit_server_set_export_description (srv, "server-wide description"),
               "set_export_description");
  harness_signals (NULL, NULL, NULL);
  return harness_status (harness_serve (srv, unix_path));
}
