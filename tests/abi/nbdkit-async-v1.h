/*
 * nbdkit-async-v1.h: the OLDER shape of the public header, kept for the
 * ABI test in tests/test_system_library.py. Do not update it when the
 * library grows: it stands for plugins compiled before `cancel`,
 * `extents`, `can_fast_zero`, `block_size`, `list_exports` and
 * `export_description` were appended to struct nbdkit_plugin_lowlevel.
 * Such a plugin passes its own (smaller) sizeof to nbdkit_server_new and
 * must keep working with the current library, unchanged and unrebuilt.
 *
 * Only the declarations tests/abi/old_plugin.c uses are here; each is
 * copied verbatim (signature-wise) from the header of that time.
 */

#ifndef NBDKIT_ASYNC_V1_H
#define NBDKIT_ASYNC_V1_H

#include <stddef.h>
#include <stdint.h>

#define NBDKIT_FLAG_FUA (1 << 1)
#define NBDKIT_FLAG_MAY_TRIM (1 << 0)

typedef struct nbdkit_op nbdkit_op;
typedef struct nbdkit_server nbdkit_server;

typedef struct nbdkit_plugin_lowlevel {
  const char *name;
  void *(*open)(void *user_data, int readonly, const char *export_name);
  void (*close)(void *handle);
  int64_t (*get_size)(void *handle);
  int (*can_write)(void *handle);
  int (*can_flush)(void *handle);
  int (*can_trim)(void *handle);
  int (*can_zero)(void *handle);
  int (*can_fua)(void *handle);
  int (*can_multi_conn)(void *handle);
  int (*can_cache)(void *handle);
  int (*pread)(struct nbdkit_op *op, void *handle, void *buf, uint32_t count,
               uint64_t offset, uint32_t flags);
  int (*pwrite)(struct nbdkit_op *op, void *handle, const void *buf,
                uint32_t count, uint64_t offset, uint32_t flags);
  int (*flush)(struct nbdkit_op *op, void *handle, uint32_t flags);
  int (*trim)(struct nbdkit_op *op, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags);
  int (*zero)(struct nbdkit_op *op, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags);
  int (*cache)(struct nbdkit_op *op, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags);
} nbdkit_plugin_lowlevel;

#ifdef __cplusplus
extern "C" {
#endif

int nbdkit_reply (struct nbdkit_op *op);
int nbdkit_reply_read (struct nbdkit_op *op, const void *data, uint32_t count);
int nbdkit_reply_error (struct nbdkit_op *op, int errnum);

struct nbdkit_server *nbdkit_server_new (const struct nbdkit_plugin_lowlevel *plugin,
                                         size_t plugin_size, void *user_data);
void nbdkit_server_free (struct nbdkit_server *srv);
int nbdkit_server_listen_unix (struct nbdkit_server *srv, const char *path);
int nbdkit_main_loop (struct nbdkit_server *srv);
void nbdkit_shutdown (void);

#ifdef __cplusplus
}
#endif

#endif /* NBDKIT_ASYNC_V1_H */
