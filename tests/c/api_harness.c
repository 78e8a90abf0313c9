/* api_harness: a test plugin + server that drives the libnbdkit-async C API
 * directly, for tests/test_c_api.py.
 *
 *   api_harness --mode MODE --unix PATH [--size N[K|M|G]] [--workers N]
 *               [--hold-ms N] [--shutdown-after N] [--max-inflight N]
 *               [--request-timeout-ms N] [--shutdown-grace-ms N]
 *               [--memory-limits PER_CONN:TOTAL] [--handshake-timeout-ms N]
 *               [--tcp-port N]
 *
 * The export is an in-memory disk (default 64 MiB) that starts out holding
 * byte (offset % 251) at every offset. How ops are answered depends on MODE:
 *
 *   thread           every op is answered by a worker thread, never inside
 *                    the callback; the last MiB of the disk is "bad": reads
 *                    fail with ENOMEM, writes with errno 0 (-> EIO), both
 *                    through nbdkit_reply_error.
 *   inline           every op is answered inside its callback (same bad MiB).
 *   after-disconnect every op is held for --hold-ms (default 1000) and then
 *                    answered by a worker thread, normally after the client
 *                    has gone away.
 *   shutdown         every op is held; on the --shutdown-after'th op
 *                    (default 8), on SIGUSR1, SIGTERM or SIGINT a controller
 *                    thread calls nbdkit_server_shutdown, waits 300 ms and
 *                    then releases every held op to the workers.
 *   double-reply     every op is answered twice (variants: worker+worker,
 *                    inline+worker, inline+inline); the second answer is an
 *                    error or a success that the client must never see. At
 *                    exit the last op is answered again after main_loop
 *                    returned (must give -ESHUTDOWN) and after
 *                    nbdkit_server_free (-ESTALE), and NULL is answered.
 *   fail-immediately callbacks return -1: pread with errno 0 (-> EIO) below
 *                    1 MiB and succeeds inline above it, pwrite ENOSPC,
 *                    flush EPERM, trim EINVAL, zero ENOMEM, cache EROFS (-> EPERM).
 *   out-of-order     reads at offset >= 32 MiB are answered after 2 s by a
 *                    worker, everything else at once by a worker.
 *   never-reply      every op is held, unanswered, until SIGUSR1 or a stop
 *                    signal (SIGTERM, SIGINT) releases the held ops to the
 *                    workers; ops arriving after that are answered at once.
 *                    With --request-timeout-ms the client is answered by the
 *                    library first and the release makes late replies.
 *   cancel           sets the `cancel` callback. Reads, writes, trims and
 *                    zeroes at offset >= 32 MiB are held until cancelled;
 *                    everything else is answered at once by a worker. A
 *                    cancelled held op is answered ECANCELED, alternately
 *                    inside the cancel callback and from a worker. stdout:
 *                    "cancel held KIND OFFSET COUNT", or "cancel busy" for
 *                    an op a worker is about to answer. A second cancel
 *                    of one op is a HARNESS-ERROR.
 *   grace            sets the `cancel` callback, which only records ("cancel
 *                    held ..."): every op is held and never answered while
 *                    the loop runs. Use with --shutdown-grace-ms. After
 *                    nbdkit_main_loop returns, a third of the held ops is
 *                    answered (each must give -ESHUTDOWN), a third is
 *                    answered after nbdkit_server_free (-ESTALE), and the
 *                    rest never: nbdkit_server_free must release them.
 *                    stdout: "grace late replies: N after main_loop, M after
 *                    free, K never".
 *   restart          two servers, one after the other, in one process. The
 *                    first op of server A is held and never answered; it
 *                    makes a controller thread shut A down, which (grace 0)
 *                    answers its client ESHUTDOWN. A is freed, server B is
 *                    created on the same socket ("ready again"). B's first
 *                    op triggers a reply with A's stale op handle, which
 *                    must return -ESTALE and touch nothing of B ("stale
 *                    reply ..."); B's op itself is answered 300 ms later.
 *
 * --request-timeout-ms, --shutdown-grace-ms, --memory-limits and
 * --handshake-timeout-ms call nbdkit_server_set_request_timeout_ms,
 * nbdkit_server_set_shutdown_grace_ms, nbdkit_server_set_memory_limits
 * (sizes take K/M/G suffixes) and nbdkit_server_set_handshake_timeout_ms.
 * --tcp-port N also serves 127.0.0.1:N.
 *
 * Reads are answered in turn by filling the library's buffer and calling
 * nbdkit_reply, with nbdkit_reply_read from a private copy, and with
 * nbdkit_reply_read_nocopy lending a private copy; at exit every loan must
 * have been released exactly once ("loans: N made, N released").
 *
 * stdout (line-buffered): "ready" once listening, "op KIND OFFSET COUNT"
 * for every I/O callback, "reply-rc ..." for every reply call that did not
 * return 0, "main_loop returned N" at the end. Self-check failures go to
 * stderr prefixed "HARNESS-ERROR"; the exit status is 0 only when
 * nbdkit_main_loop returned 0 and no self-check failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-async.h>

#include "harness.h"

#define MIB (UINT64_C (1) << 20)
#define HANDLE_MAGIC UINT32_C (0x6e62646b)

enum mode {
  MODE_THREAD, MODE_INLINE, MODE_AFTER_DISCONNECT, MODE_SHUTDOWN,
  MODE_DOUBLE_REPLY, MODE_FAIL_IMMEDIATELY, MODE_OUT_OF_ORDER,
  MODE_NEVER_REPLY, MODE_CANCEL, MODE_GRACE, MODE_RESTART,
};

static const char *const mode_names[] = {
  "thread", "inline", "after-disconnect", "shutdown",
  "double-reply", "fail-immediately", "out-of-order",
  "never-reply", "cancel", "grace", "restart",
};

enum kind { K_READ, K_WRITE, K_FLUSH, K_TRIM, K_ZERO, K_CACHE };

static const char *const kind_names[] = {
  "pread", "pwrite", "flush", "trim", "zero", "cache",
};

/* How a job answers its op. */
enum answer {
  A_PERFORM,          /* do the I/O, reply once */
  A_PERFORM_TWICE,    /* do the I/O, reply, then reply again */
  A_SECOND_ONLY,      /* the op was already answered: reply again */
  A_CANCELLED,        /* cancel mode: answer ECANCELED */
};

/* How a read is answered, in rotation. */
enum read_style {
  FILL,                       /* fill the library's buffer, nbdkit_reply */
  COPY,                       /* nbdkit_reply_read from a private copy */
  LEND,                       /* nbdkit_reply_read_nocopy of a private copy */
};

struct job {
  struct job *next;
  nbdkit_op *op;
  enum kind kind;
  enum answer answer;
  void *buf;                  /* pread: library's buffer; pwrite: payload */
  uint32_t count;
  uint64_t offset;
  uint32_t flags;
  enum read_style read_style;
  struct timespec due;
};

/* A per-connection plugin handle, checked on every callback. */
struct handle {
  uint32_t magic;
  unsigned id;
  int readonly;
};

static enum mode mode = MODE_THREAD;
static nbdkit_server *server;
static pthread_t loop_thread;

static unsigned char *disk;
static uint64_t disk_size = 64 * MIB;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_cond;
static struct job *queue;       /* runnable, sorted by due time */
static struct job *held;        /* shutdown, never-reply, cancel, grace:
                                   ops not given to the workers (yet) */
static bool released;           /* shutdown, never-reply: held ops were let go */
static bool stopping;

static long hold_ms = 1000;
static unsigned long shutdown_after = 8;
static unsigned long ops_seen;  /* loop thread only */
static unsigned long reads_seen;        /* loop thread only */
static nbdkit_op *last_op;      /* loop thread only: for late replies */

/* cancel and grace modes, loop thread only: every op cancel was called
 * for, to catch a second cancel of the same op. */
static nbdkit_op **cancelled_ops;
static size_t n_cancelled, cap_cancelled;

/* restart mode, loop thread only. */
static bool restarted;          /* server B is the one running */
static nbdkit_op *stale_op;     /* server A's unanswered op */
static bool stale_checked;

static sem_t control_sem;
static atomic_bool control_quit;
static atomic_int open_handles;
static atomic_uint next_handle_id;

static struct timespec
after_ms (long ms)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  t.tv_sec += ms / 1000;
  t.tv_nsec += (ms % 1000) * 1000000L;
  if (t.tv_nsec >= 1000000000L) {
    t.tv_sec++;
    t.tv_nsec -= 1000000000L;
  }
  return t;
}

static int
ts_cmp (const struct timespec *a, const struct timespec *b)
{
  if (a->tv_sec != b->tv_sec)
    return a->tv_sec < b->tv_sec ? -1 : 1;
  if (a->tv_nsec != b->tv_nsec)
    return a->tv_nsec < b->tv_nsec ? -1 : 1;
  return 0;
}

static void
sleep_ms (long ms)
{
  struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };

  while (nanosleep (&t, &t) == -1 && errno == EINTR)
    ;
}

/* Queue lock held. */
static void
enqueue_locked (struct job *j)
{
  struct job **p = &queue;

  while (*p && ts_cmp (&(*p)->due, &j->due) <= 0)
    p = &(*p)->next;
  j->next = *p;
  *p = j;
  pthread_cond_broadcast (&queue_cond);
}

static struct job *
new_job (nbdkit_op *op, enum kind kind, enum answer answer, void *buf,
         uint32_t count, uint64_t offset, uint32_t flags, enum read_style read_style)
{
  struct job *j = calloc (1, sizeof *j);

  if (j == NULL) {
    perror ("calloc");
    abort ();
  }
  j->op = op;
  j->kind = kind;
  j->answer = answer;
  j->buf = buf;
  j->count = count;
  j->offset = offset;
  j->flags = flags;
  j->read_style = read_style;
  return j;
}

static void
submit (struct job *j, long delay_ms)
{
  j->due = after_ms (delay_ms);
  pthread_mutex_lock (&queue_lock);
  enqueue_locked (j);
  pthread_mutex_unlock (&queue_lock);
}

static void
check_rc (const char *what, const struct job *j, int rc, bool second)
{
  if (rc == 0)
    return;
  harness_say ("reply-rc %s %s %d%s", what, kind_names[j->kind], rc,
       second ? " second" : "");
  /* A first reply may only fail once the loop has gone, which the loop
   * must not allow while it still owns the op. */
  if (!second)
    harness_error ("first %s to %s at %llu returned %d", what,
                   kind_names[j->kind], (unsigned long long) j->offset, rc);
}

static bool
in_bad_region (const struct job *j)
{
  return (mode == MODE_THREAD || mode == MODE_INLINE) &&
    j->offset + j->count > disk_size - MIB;
}

/* Lent buffers: every one must come back exactly once (checked at exit). */
static atomic_ulong loans_made, loans_released;

struct loan {
  unsigned magic;             /* LOAN_MAGIC while lent, 0 once released */
  unsigned char data[];
};
#define LOAN_MAGIC 0x10a4u

static void
release_loan (void *ctx)
{
  struct loan *l = ctx;
  if (l->magic != LOAN_MAGIC)
    harness_error ("loan released twice or never lent");
  l->magic = 0;
  atomic_fetch_add (&loans_released, 1);
  free (l);
}

/* Answers a read with nbdkit_reply_read_nocopy, lending a copy of `data`
 * that the library hands back through release_loan. Takes `data`. */
static int
lend (nbdkit_op *op, void *data, uint32_t count)
{
  struct loan *l = malloc (sizeof *l + count);
  if (l == NULL) {
    perror ("malloc");
    abort ();
  }
  l->magic = LOAN_MAGIC;
  memcpy (l->data, data, count);
  free (data);
  atomic_fetch_add (&loans_made, 1);
  return nbdkit_reply_read_nocopy (op, l->data, count, release_loan, l);
}

/* Performs the I/O of a job and answers its op once. */
static void
perform (const struct job *j)
{
  int rc;

  if (j->offset > disk_size || j->count > disk_size - j->offset) {
    harness_error ("%s out of range: offset %llu count %u",
                   kind_names[j->kind], (unsigned long long) j->offset,
                   j->count);
    check_rc ("nbdkit_reply_error", j, nbdkit_reply_error (j->op, EIO), false);
    return;
  }

  if (in_bad_region (j) &&
      (j->kind == K_READ || j->kind == K_WRITE || j->kind == K_ZERO)) {
    int err = j->kind == K_READ ? ENOMEM : 0;
    check_rc ("nbdkit_reply_error", j, nbdkit_reply_error (j->op, err), false);
    return;
  }

  switch (j->kind) {
  case K_READ:
    if (j->read_style != FILL) {
      void *copy = malloc (j->count ? j->count : 1);
      if (copy == NULL) {
        perror ("malloc");
        abort ();
      }
      pthread_mutex_lock (&disk_lock);
      memcpy (copy, disk + j->offset, j->count);
      pthread_mutex_unlock (&disk_lock);
      if (j->read_style == LEND) {
        rc = lend (j->op, copy, j->count);
        check_rc ("nbdkit_reply_read_nocopy", j, rc, false);
        return;
      }
      rc = nbdkit_reply_read (j->op, copy, j->count);
      free (copy);
      check_rc ("nbdkit_reply_read", j, rc, false);
      return;
    }
    pthread_mutex_lock (&disk_lock);
    memcpy (j->buf, disk + j->offset, j->count);
    pthread_mutex_unlock (&disk_lock);
    break;
  case K_WRITE:
    pthread_mutex_lock (&disk_lock);
    memcpy (disk + j->offset, j->buf, j->count);
    pthread_mutex_unlock (&disk_lock);
    break;
  case K_TRIM:
  case K_ZERO:
    pthread_mutex_lock (&disk_lock);
    memset (disk + j->offset, 0, j->count);
    pthread_mutex_unlock (&disk_lock);
    break;
  case K_FLUSH:
  case K_CACHE:
    break;
  }
  check_rc ("nbdkit_reply", j, nbdkit_reply (j->op), false);
}

/* A second answer to an op that was already answered. Never touches the
 * op's buffers: they are no longer ours. */
static void
answer_again (const struct job *j, unsigned variant)
{
  static const unsigned char junk[16] = "second reply!!!";
  int rc;

  harness_say ("answered again %s %llu", kind_names[j->kind],
               (unsigned long long) j->offset);
  switch (variant % 4) {
  case 0:
    rc = nbdkit_reply_error (j->op, EIO);
    check_rc ("nbdkit_reply_error", j, rc, true);
    break;
  case 1:
    rc = nbdkit_reply (j->op);
    check_rc ("nbdkit_reply", j, rc, true);
    break;
  case 2:
    rc = nbdkit_reply_read (j->op, junk, sizeof junk);
    check_rc ("nbdkit_reply_read", j, rc, true);
    break;
  default: {
    /* Ignored by the library, but the loan must still come back. */
    void *copy = malloc (sizeof junk);
    if (copy == NULL)
      abort ();
    memcpy (copy, junk, sizeof junk);
    rc = lend (j->op, copy, sizeof junk);
    check_rc ("nbdkit_reply_read_nocopy", j, rc, true);
    break;
  }
  }
}

static void
run_job (struct job *j)
{
  static atomic_uint variant;

  switch (j->answer) {
  case A_PERFORM:
    perform (j);
    break;
  case A_PERFORM_TWICE:
    perform (j);
    answer_again (j, atomic_fetch_add (&variant, 1));
    break;
  case A_SECOND_ONLY:
    answer_again (j, atomic_fetch_add (&variant, 1));
    break;
  case A_CANCELLED:
    check_rc ("nbdkit_reply_error", j, nbdkit_reply_error (j->op, ECANCELED),
              false);
    break;
  }
  free (j);
}

static void *
worker (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&queue_lock);
  for (;;) {
    struct timespec now;

    if (stopping)
      break;
    clock_gettime (CLOCK_MONOTONIC, &now);
    if (queue && ts_cmp (&queue->due, &now) <= 0) {
      struct job *j = queue;
      queue = j->next;
      pthread_mutex_unlock (&queue_lock);
      run_job (j);
      pthread_mutex_lock (&queue_lock);
    }
    else if (queue)
      pthread_cond_timedwait (&queue_cond, &queue_lock, &queue->due);
    else
      pthread_cond_wait (&queue_cond, &queue_lock);
  }
  pthread_mutex_unlock (&queue_lock);
  return NULL;
}

/* shutdown mode: waits for the trigger, shuts the server down from this
 * (non-loop) thread, then lets the held ops go after a short delay.
 * never-reply mode: lets the held ops go at once on the trigger. */
static void *
controller (void *arg)
{
  (void) arg;
  for (;;) {
    struct job *j, *next;
    int r;

    while ((r = sem_wait (&control_sem)) == -1 && errno == EINTR)
      ;
    if (r == -1 || atomic_load (&control_quit))
      break;
    if (mode == MODE_SHUTDOWN || mode == MODE_RESTART) {
      if (nbdkit_server_shutdown (server) != 0)
        harness_error ("nbdkit_server_shutdown failed");
      harness_say ("shutdown requested");
      if (mode == MODE_RESTART)
        continue;
      sleep_ms (300);
    }
    pthread_mutex_lock (&queue_lock);
    released = true;
    for (j = held; j != NULL; j = next) {
      next = j->next;
      j->due = after_ms (0);
      enqueue_locked (j);
    }
    held = NULL;
    pthread_mutex_unlock (&queue_lock);
    harness_say ("held ops released");
  }
  return NULL;
}

static void
check_thread (const char *what)
{
  if (!pthread_equal (pthread_self (), loop_thread))
    harness_error ("%s called off the event-loop thread", what);
}

static struct handle *
check_handle (void *h, const char *what)
{
  struct handle *hd = h;

  check_thread (what);
  if (hd == NULL || hd->magic != HANDLE_MAGIC) {
    harness_error ("%s got a bad handle %p", what, h);
    return NULL;
  }
  return hd;
}

/* The common path of every I/O callback. */
static int
dispatch (nbdkit_op *op, void *h, enum kind kind, void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{
  enum read_style read_style = FILL;
  unsigned long n;
  struct job *j;

  if (check_handle (h, kind_names[kind]) == NULL) {
    errno = EIO;
    return -1;
  }
  if (op == NULL) {
    harness_error ("%s got a NULL op", kind_names[kind]);
    errno = EIO;
    return -1;
  }
  n = ++ops_seen;
  last_op = op;
  if (kind == K_READ)
    read_style = (enum read_style) (reads_seen++ % 3);
  harness_say ("op %s %llu %u", kind_names[kind], (unsigned long long) offset, count);

  switch (mode) {
  case MODE_THREAD:
    submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                     read_style), 0);
    return 0;

  case MODE_INLINE: {
    struct job jb = {
      .op = op, .kind = kind, .answer = A_PERFORM, .buf = buf,
      .count = count, .offset = offset, .flags = flags,
      .read_style = read_style,
    };
    perform (&jb);
    return 0;
  }

  case MODE_AFTER_DISCONNECT:
    submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                     read_style), hold_ms);
    return 0;

  case MODE_SHUTDOWN:
  case MODE_NEVER_REPLY:
    j = new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                 read_style);
    j->due = after_ms (0);
    pthread_mutex_lock (&queue_lock);
    if (released)
      enqueue_locked (j);
    else {
      j->next = held;
      held = j;
    }
    pthread_mutex_unlock (&queue_lock);
    if (mode == MODE_SHUTDOWN && n == shutdown_after)
      sem_post (&control_sem);
    return 0;

  case MODE_CANCEL:
    if (offset >= 32 * MIB &&
        (kind == K_READ || kind == K_WRITE || kind == K_TRIM ||
         kind == K_ZERO)) {
      j = new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                   read_style);
      pthread_mutex_lock (&queue_lock);
      j->next = held;
      held = j;
      pthread_mutex_unlock (&queue_lock);
    }
    else
      submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                       read_style), 0);
    return 0;

  case MODE_RESTART:
    if (!restarted) {
      if (stale_op == NULL) {   /* never answered: dies with server A */
        stale_op = op;
        harness_say ("holding op %p", (void *) op);
        sem_post (&control_sem);
        return 0;
      }
      submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                       read_style), 0);
      return 0;
    }
    if (!stale_checked && stale_op != NULL) {
      int r;
      stale_checked = true;
      r = nbdkit_reply (stale_op);
      harness_say ("stale reply to %p (the new op is %p): %d", (void *) stale_op,
           (void *) op, r);
      if (r != -ESTALE)
        harness_error ("a reply to an op of a freed server returned %d, "
                       "not -ESTALE", r);
      submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                       read_style), 300);
      return 0;
    }
    submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                     read_style), 0);
    return 0;

  case MODE_GRACE:
    j = new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                 read_style);
    pthread_mutex_lock (&queue_lock);
    j->next = held;
    held = j;
    pthread_mutex_unlock (&queue_lock);
    return 0;

  case MODE_DOUBLE_REPLY:
    switch (n % 3) {
    case 0:                     /* both answers from a worker */
      submit (new_job (op, kind, A_PERFORM_TWICE, buf, count, offset, flags,
                       read_style), 0);
      break;
    case 1: {                   /* first inline, second from a worker */
      struct job jb = {
        .op = op, .kind = kind, .answer = A_PERFORM, .buf = buf,
        .count = count, .offset = offset, .flags = flags,
        .read_style = read_style,
      };
      perform (&jb);
      submit (new_job (op, kind, A_SECOND_ONLY, NULL, count, offset, flags,
                       false), 5);
      break;
    }
    default: {                  /* both inline */
      struct job jb = {
        .op = op, .kind = kind, .answer = A_PERFORM_TWICE, .buf = buf,
        .count = count, .offset = offset, .flags = flags,
        .read_style = read_style,
      };
      perform (&jb);
      answer_again (&jb, (unsigned) n);
      break;
    }
    }
    return 0;

  case MODE_FAIL_IMMEDIATELY:
    switch (kind) {
    case K_READ:
      if (offset >= MIB) {      /* the connection still works */
        struct job jb = {
          .op = op, .kind = kind, .answer = A_PERFORM, .buf = buf,
          .count = count, .offset = offset, .flags = flags,
          .read_style = read_style,
        };
        perform (&jb);
        return 0;
      }
      errno = 0;                /* the library must answer EIO */
      return -1;
    case K_WRITE: errno = ENOSPC; return -1;
    case K_FLUSH: errno = EPERM; return -1;
    case K_TRIM: errno = EINVAL; return -1;
    case K_ZERO: errno = ENOMEM; return -1;
    case K_CACHE: errno = EROFS; return -1;   /* -> EPERM */
    }
    return -1;

  case MODE_OUT_OF_ORDER:
    submit (new_job (op, kind, A_PERFORM, buf, count, offset, flags,
                     read_style),
            kind == K_READ && offset >= 32 * MIB ? 2000 : 0);
    return 0;
  }
  harness_error ("unknown mode");
  errno = EIO;
  return -1;
}

static void *
h_open (void *user_data, int readonly, const char *export_name)
{
  struct handle *h;

  check_thread ("open");
  if (user_data != &disk)
    harness_error ("open got user_data %p, not %p", user_data,
                   (void *) &disk);
  if (export_name == NULL)
    harness_error ("open got a NULL export name");
  h = malloc (sizeof *h);
  if (h == NULL)
    return NULL;
  h->magic = HANDLE_MAGIC;
  h->id = atomic_fetch_add (&next_handle_id, 1);
  h->readonly = readonly;
  atomic_fetch_add (&open_handles, 1);
  harness_say ("open %u readonly=%d export=\"%s\"", h->id, readonly,
       export_name ? export_name : "(null)");
  return h;
}

static void
h_close (void *hv)
{
  struct handle *h = check_handle (hv, "close");

  if (h == NULL)
    return;
  harness_say ("close %u", h->id);
  h->magic = 0;
  free (h);
  atomic_fetch_sub (&open_handles, 1);
}

static int64_t
h_get_size (void *h)
{
  if (check_handle (h, "get_size") == NULL)
    return -1;
  return (int64_t) disk_size;
}

static int
h_can_multi_conn (void *h)
{
  return check_handle (h, "can_multi_conn") ? 1 : -1;
}

static int
h_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  if (buf == NULL && count > 0) {
    harness_error ("pread got a NULL buffer");
    errno = EIO;
    return -1;
  }
  return dispatch (op, h, K_READ, buf, count, offset, flags);
}

static int
h_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags)
{
  if (buf == NULL && count > 0) {
    harness_error ("pwrite got a NULL buffer");
    errno = EIO;
    return -1;
  }
  /* The payload is read-only to us; the job only reads from it. */
  return dispatch (op, h, K_WRITE, (void *) (uintptr_t) buf, count, offset,
                   flags);
}

static int
h_flush (nbdkit_op *op, void *h, uint32_t flags)
{
  return dispatch (op, h, K_FLUSH, NULL, 0, 0, flags);
}

static int
h_trim (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
        uint32_t flags)
{
  return dispatch (op, h, K_TRIM, NULL, count, offset, flags);
}

static int
h_zero (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
        uint32_t flags)
{
  return dispatch (op, h, K_ZERO, NULL, count, offset, flags);
}

static int
h_cache (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
         uint32_t flags)
{
  return dispatch (op, h, K_CACHE, NULL, count, offset, flags);
}

/* cancel and grace modes. Runs on the loop thread, at most once per op,
 * only while the op is unanswered. */
static void
h_cancel (nbdkit_op *op, void *h)
{
  static unsigned long n_held_cancels;
  struct job **p, *j = NULL;
  size_t i;

  if (check_handle (h, "cancel") == NULL)
    return;
  if (op == NULL) {
    harness_error ("cancel got a NULL op");
    return;
  }
  for (i = 0; i < n_cancelled; i++)
    if (cancelled_ops[i] == op) {
      harness_error ("cancel called twice for one op");
      return;
    }
  if (n_cancelled == cap_cancelled) {
    size_t cap = cap_cancelled ? 2 * cap_cancelled : 256;
    nbdkit_op **a = realloc (cancelled_ops, cap * sizeof *a);
    if (a == NULL) {
      perror ("realloc");
      abort ();
    }
    cancelled_ops = a;
    cap_cancelled = cap;
  }
  cancelled_ops[n_cancelled++] = op;

  pthread_mutex_lock (&queue_lock);
  for (p = &held; *p != NULL; p = &(*p)->next)
    if ((*p)->op == op) {
      j = *p;
      if (mode == MODE_CANCEL)
        *p = j->next;           /* ours to answer now */
      break;
    }
  pthread_mutex_unlock (&queue_lock);

  if (j == NULL) {
    /* Not held: a worker has it queued and will answer it. */
    harness_say ("cancel busy");
    return;
  }
  harness_say ("cancel held %s %llu %u", kind_names[j->kind],
       (unsigned long long) j->offset, j->count);
  if (mode != MODE_CANCEL)
    return;                     /* grace: the plugin ignores cancellation */
  j->answer = A_CANCELLED;
  if (n_held_cancels++ % 2 == 0)
    run_job (j);                /* inside the callback */
  else
    submit (j, 0);              /* from a worker, later */
}

static void
on_stop (void)
{
  nbdkit_shutdown ();
  if (mode == MODE_SHUTDOWN || mode == MODE_NEVER_REPLY)
    sem_post (&control_sem);
}

static void
on_usr1 (void)
{
  sem_post (&control_sem);
}

/* The running server: SIGUSR2 prints its counters. */
static pthread_mutex_t server_lock = PTHREAD_MUTEX_INITIALIZER;

static void
on_usr2 (void)
{
  pthread_mutex_lock (&server_lock);
  harness_print_stats (server, NULL);
  pthread_mutex_unlock (&server_lock);
}

static void
free_server (void)
{
  pthread_mutex_lock (&server_lock);
  nbdkit_server_free (server);
  server = NULL;
  pthread_mutex_unlock (&server_lock);
}

static const char usage[] =
  "--mode MODE --unix PATH [--size N[K|M|G]] [--workers N] [--hold-ms N]\n"
  "       [--shutdown-after N] [--max-inflight N] [--request-timeout-ms N]\n"
  "       [--shutdown-grace-ms N] [--memory-limits PER_CONN:TOTAL]\n"
  "       [--handshake-timeout-ms N] [--tcp-port N]";

static uint64_t mem_per_conn, mem_total;

static void
opt_mode (const char *val)
{
  size_t m;

  for (m = 0; m < sizeof mode_names / sizeof mode_names[0]; m++)
    if (strcmp (val, mode_names[m]) == 0)
      break;
  if (m == sizeof mode_names / sizeof mode_names[0]) {
    fprintf (stderr, "api_harness: unknown mode: %s\n", val);
    exit (2);
  }
  mode = (enum mode) m;
}

static void
opt_memory_limits (const char *val)
{
  char per[64];
  const char *colon = strchr (val, ':');

  if (colon == NULL || (size_t) (colon - val) >= sizeof per)
    harness_usage (usage);
  memcpy (per, val, colon - val);
  per[colon - val] = '\0';
  mem_per_conn = harness_parse_size (per);
  mem_total = harness_parse_size (colon + 1);
}

int
main (int argc, char *argv[])
{
  static struct nbdkit_plugin_lowlevel plugin = {
    .name = "api_harness",
    .open = h_open,
    .close = h_close,
    .get_size = h_get_size,
    .can_multi_conn = h_can_multi_conn,
    .pread = h_pread,
    .pwrite = h_pwrite,
    .flush = h_flush,
    .trim = h_trim,
    .zero = h_zero,
    .cache = h_cache,
  };
  const char *sock = NULL;
  long workers = 2;
  long max_inflight = 0;
  long tcp_port = 0;
  long request_timeout_ms = -1;
  long shutdown_grace_ms = -1;
  long handshake_timeout_ms = -1;
  long after = (long) shutdown_after;
  unsigned long grace_after_loop = 0, grace_after_free = 0, grace_never = 0;
  struct job *grace_jobs = NULL;
  pthread_t threads[8];
  pthread_t control_thread;
  pthread_condattr_t cattr;
  struct job *j, *next;
  unsigned long unreplied = 0;
  uint64_t i;
  int r, k;
  int status = 0;
  const struct harness_opt opts[] = {
    { "--mode", HARNESS_CALL, NULL, opt_mode },
    { "--unix", HARNESS_STRING, &sock, NULL },
    { "--size", HARNESS_SIZE, &disk_size, NULL },
    { "--workers", HARNESS_LONG, &workers, NULL },
    { "--hold-ms", HARNESS_LONG, &hold_ms, NULL },
    { "--shutdown-after", HARNESS_LONG, &after, NULL },
    { "--max-inflight", HARNESS_LONG, &max_inflight, NULL },
    { "--tcp-port", HARNESS_LONG, &tcp_port, NULL },
    { "--request-timeout-ms", HARNESS_LONG, &request_timeout_ms, NULL },
    { "--shutdown-grace-ms", HARNESS_LONG, &shutdown_grace_ms, NULL },
    { "--handshake-timeout-ms", HARNESS_LONG, &handshake_timeout_ms, NULL },
    { "--memory-limits", HARNESS_CALL, NULL, opt_memory_limits },
    { NULL, 0, NULL, NULL },
  };

  harness_init ("api_harness");
  harness_parse (argc, argv, opts, usage);
  shutdown_after = (unsigned long) after;
  if (sock == NULL || workers < 1 || workers > 8)
    harness_usage (usage);
  if (disk_size <= 2 * MIB && (mode == MODE_THREAD || mode == MODE_INLINE)) {
    fprintf (stderr, "api_harness: --size must exceed 2M in this mode\n");
    exit (2);
  }

  disk = malloc (disk_size);
  if (disk == NULL) {
    perror ("malloc");
    exit (1);
  }
  for (i = 0; i < disk_size; i++)
    disk[i] = (unsigned char) (i % 251);

  pthread_condattr_init (&cattr);
  pthread_condattr_setclock (&cattr, CLOCK_MONOTONIC);
  pthread_cond_init (&queue_cond, &cattr);
  pthread_condattr_destroy (&cattr);
  if (sem_init (&control_sem, 0, 0) == -1) {
    perror ("sem_init");
    exit (1);
  }

  signal (SIGPIPE, SIG_IGN);
  harness_signals (on_stop, on_usr1, on_usr2);

  if (mode == MODE_CANCEL || mode == MODE_GRACE)
    plugin.cancel = h_cancel;
  if (mode == MODE_RESTART)
    shutdown_grace_ms = 0;      /* server A returns with its op unanswered */
  loop_thread = pthread_self ();
 again:
  pthread_mutex_lock (&server_lock);
  server = nbdkit_server_new (&plugin, sizeof plugin, &disk);
  pthread_mutex_unlock (&server_lock);
  if (server == NULL) {
    fprintf (stderr, "api_harness: nbdkit_server_new failed\n");
    exit (1);
  }
  if (request_timeout_ms >= 0 &&
      (r = nbdkit_server_set_request_timeout_ms (server,
                                                 (uint32_t) request_timeout_ms))
      != 0) {
    fprintf (stderr, "api_harness: set_request_timeout_ms: %s\n",
             strerror (-r));
    exit (1);
  }
  if (shutdown_grace_ms >= 0 &&
      (r = nbdkit_server_set_shutdown_grace_ms (server, shutdown_grace_ms))
      != 0) {
    fprintf (stderr, "api_harness: set_shutdown_grace_ms: %s\n",
             strerror (-r));
    exit (1);
  }
  if (handshake_timeout_ms >= 0 &&
      (r = nbdkit_server_set_handshake_timeout_ms (server,
                                                   (uint32_t) handshake_timeout_ms))
      != 0) {
    fprintf (stderr, "api_harness: set_handshake_timeout_ms: %s\n",
             strerror (-r));
    exit (1);
  }
  if ((mem_per_conn || mem_total) &&
      (r = nbdkit_server_set_memory_limits (server, (size_t) mem_per_conn,
                                            (size_t) mem_total)) != 0) {
    fprintf (stderr, "api_harness: set_memory_limits: %s\n", strerror (-r));
    exit (1);
  }
  if (max_inflight > 0 &&
      (r = nbdkit_server_set_max_inflight (server, (uint32_t) max_inflight))
      != 0) {
    fprintf (stderr, "api_harness: set_max_inflight: %s\n", strerror (-r));
    exit (1);
  }
  r = nbdkit_server_listen_unix (server, sock);
  if (r != 0) {
    fprintf (stderr, "api_harness: listen on %s: %s\n", sock, strerror (-r));
    nbdkit_server_free (server);
    exit (1);
  }
  if (tcp_port > 0 &&
      (r = nbdkit_server_listen_tcp (server, "127.0.0.1", (uint16_t) tcp_port))
      < 0) {
    fprintf (stderr, "api_harness: listen on port %ld: %s\n", tcp_port,
             strerror (-r));
    nbdkit_server_free (server);
    exit (1);
  }
  if (restarted) {
    harness_say ("ready again");
    goto run;
  }

  for (k = 0; k < workers; k++)
    if ((r = pthread_create (&threads[k], NULL, worker, NULL)) != 0) {
      fprintf (stderr, "pthread_create: %s\n", strerror (r));
      exit (1);
    }
  if ((r = pthread_create (&control_thread, NULL, controller, NULL)) != 0) {
    fprintf (stderr, "pthread_create: %s\n", strerror (r));
    exit (1);
  }

  harness_say ("ready");
 run:
  r = nbdkit_main_loop (server);
  if (mode == MODE_RESTART && !restarted) {
    harness_say ("first main_loop returned %d", r);
    if (r != 0)
      status = 1;
    /* Server A goes away with its op unanswered; B takes its place. */
    free_server ();
    harness_say ("server A freed");
    restarted = true;
    shutdown_grace_ms = -1;
    goto again;
  }
  harness_say ("main_loop returned %d", r);
  if (r != 0)
    status = 1;

  /* Every op was answered before the loop returned (that is the loop's
   * contract); the only jobs left may be second answers of double-reply
   * mode. Let those run, then stop the workers. */
  pthread_mutex_lock (&queue_lock);
  if (mode == MODE_GRACE) {
    /* The grace period let the loop return with these ops unanswered:
     * answer a third of them now (too late: -ESHUTDOWN), keep the rest
     * for after nbdkit_server_free. */
    unsigned long n = 0;
    for (j = held; j != NULL; j = next) {
      next = j->next;
      if (n++ % 3 == 0) {
        r = nbdkit_reply_error (j->op, EIO);
        if (r != -ESHUTDOWN)
          harness_error ("reply after main_loop returned %d, not -ESHUTDOWN",
                         r);
        grace_after_loop++;
        free (j);
      }
      else {
        j->next = grace_jobs;
        grace_jobs = j;
      }
    }
    held = NULL;
  }
  for (j = held; j != NULL; j = next) {
    next = j->next;
    unreplied++;
    free (j);
  }
  held = NULL;
  for (j = queue; j != NULL; j = j->next)
    if (j->answer != A_SECOND_ONLY)
      unreplied++;
  pthread_mutex_unlock (&queue_lock);
  if (unreplied > 0)
    harness_error ("main_loop returned with %lu ops never answered",
                   unreplied);
  else {
    /* Wait (bounded) for the queued second answers. */
    for (k = 0; k < 200; k++) {
      bool empty;
      pthread_mutex_lock (&queue_lock);
      empty = queue == NULL;
      pthread_mutex_unlock (&queue_lock);
      if (empty)
        break;
      sleep_ms (10);
    }
  }

  pthread_mutex_lock (&queue_lock);
  stopping = true;
  pthread_cond_broadcast (&queue_cond);
  pthread_mutex_unlock (&queue_lock);
  for (k = 0; k < workers; k++)
    pthread_join (threads[k], NULL);
  atomic_store (&control_quit, true);
  sem_post (&control_sem);
  pthread_join (control_thread, NULL);

  for (j = queue; j != NULL; j = next) {
    next = j->next;
    free (j);
  }
  queue = NULL;

  /* In grace mode, connections with unanswered ops keep their handles
   * until nbdkit_server_free (checked below). */
  if (mode != MODE_GRACE && atomic_load (&open_handles) != 0)
    harness_error ("%d handles still open after main_loop returned",
                   atomic_load (&open_handles));

  /* double-reply mode: yet another answer to an op long answered, once
   * the loop has ended (-ESHUTDOWN) and once the server is freed (-ESTALE);
   * and a NULL op. None of them may crash. */
  if (mode == MODE_DOUBLE_REPLY && last_op != NULL) {
    r = nbdkit_reply (last_op);
    harness_say ("late reply after main_loop: %d", r);
    if (r != -ESHUTDOWN)
      harness_error ("reply after main_loop returned %d, not -ESHUTDOWN", r);
  }
  free_server ();
  if (atomic_load (&open_handles) != 0)
    harness_error ("%d handles still open after nbdkit_server_free",
                   atomic_load (&open_handles));
  if (mode == MODE_GRACE) {
    /* Half of the rest is answered after the server is gone (-ESTALE);
     * the other half never: nbdkit_server_free released them. */
    unsigned long n = 0;
    for (j = grace_jobs; j != NULL; j = next) {
      next = j->next;
      if (n++ % 2 == 0) {
        r = nbdkit_reply (j->op);
        if (r != -ESTALE)
          harness_error ("reply after nbdkit_server_free returned %d, "
                         "not -ESTALE", r);
        grace_after_free++;
      }
      else
        grace_never++;
      free (j);
    }
    grace_jobs = NULL;
    harness_say ("grace late replies: %lu after main_loop, %lu after free, %lu never",
         grace_after_loop, grace_after_free, grace_never);
  }
  free (cancelled_ops);
  cancelled_ops = NULL;
  if (mode == MODE_DOUBLE_REPLY && last_op != NULL) {
    static const char junk[8] = "late";
    int r1 = nbdkit_reply (last_op);
    int r2 = nbdkit_reply_read (last_op, junk, sizeof junk);
    int r3 = nbdkit_reply_error (last_op, EIO);
    void *copy = malloc (sizeof junk);
    if (copy == NULL)
      abort ();
    memcpy (copy, junk, sizeof junk);
    int r4 = lend (last_op, copy, sizeof junk);
    harness_say ("late replies after nbdkit_server_free: %d %d %d %d", r1, r2, r3, r4);
    if (r1 != -ESTALE || r2 != -ESTALE || r3 != -ESTALE || r4 != -ESTALE)
      harness_error ("replies after nbdkit_server_free returned %d %d %d %d, "
                     "not -ESTALE", r1, r2, r3, r4);
    r = nbdkit_reply (NULL);
    harness_say ("reply to NULL: %d", r);
    if (r >= 0)
      harness_error ("nbdkit_reply (NULL) returned %d", r);
  }
  /* Every lent buffer has come back by now, whatever became of its reply. */
  harness_say ("loans: %lu made, %lu released", atomic_load (&loans_made),
       atomic_load (&loans_released));
  if (atomic_load (&loans_made) != atomic_load (&loans_released))
    harness_error ("%lu loans made, %lu released",
                   atomic_load (&loans_made), atomic_load (&loans_released));
  pthread_cond_destroy (&queue_cond);
  sem_destroy (&control_sem);
  free (disk);
  disk = NULL;

  harness_signals_end ();
  if (atomic_load (&harness_errors) > 0)
    status = 1;
  harness_say ("exit %d", status);
  return status;
}
