/* harness.h: the plumbing the C test harnesses of tests/c share.
 *
 *   harness_init (NAME)           first thing in main: stdout line-buffered,
 *                                 SIGINT/SIGTERM/SIGUSR1/SIGUSR2 blocked in
 *                                 every thread created from now on (they go
 *                                 to the signal thread, see below)
 *   harness_parse (argc, argv, OPTS, USAGE)
 *                                 "--name VALUE" and "--flag" options from a
 *                                 table; anything else prints USAGE, exit 2
 *   harness_error (FMT, ...)      "HARNESS-ERROR: ..." on stderr, counted
 *   harness_say (FMT, ...)        one whole line on stdout
 *   harness_signals (STOP, USR1, USR2)
 *                                 a thread taking the signals with sigwait:
 *                                 SIGINT/SIGTERM call STOP (NULL:
 *                                 nbdkit_shutdown), SIGUSR1/SIGUSR2 call
 *                                 USR1/USR2 (NULL: ignored); ordinary code,
 *                                 not a signal handler
 *   harness_signals_end ()        ends and joins that thread
 *   harness_print_stats (SRV, SUFFIX)
 *                                 one line of nbdkit_server_stats counters:
 *     STATS connections=N connections_total=N in_flight=N req=r0,..,r7
 *           bytes_read=N bytes_written=N errors=N lat=l0,..,l31[SUFFIX]
 *   harness_listen (SRV, PATH)    nbdkit_server_listen_unix, or a message
 *   harness_serve (SRV, PATH)     listen, "ready", nbdkit_main_loop,
 *                                 "main_loop returned R", harness_signals_end,
 *                                 nbdkit_server_free;
 *                                 returns R (-1 if it could not listen)
 *   harness_status (R)            the exit status: 0 only when R is 0 and
 *                                 no self-check failed
 *
 * Everything is static inline: a harness uses what it needs.
 */
#ifndef HARNESS_H
#define HARNESS_H

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-async.h>

static const char *harness_name = "harness";
static atomic_int harness_errors;

static inline void
harness_init (const char *name)
{
  sigset_t set;

  harness_name = name;
  setvbuf (stdout, NULL, _IOLBF, 0);
  sigemptyset (&set);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGUSR1);
  sigaddset (&set, SIGUSR2);
  pthread_sigmask (SIG_BLOCK, &set, NULL);
}

static inline void
harness_error (const char *fmt, ...)
{
  va_list ap;
  char msg[512];

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  fprintf (stderr, "HARNESS-ERROR: %s\n", msg);
  atomic_fetch_add (&harness_errors, 1);
}

static inline void
harness_say (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  flockfile (stdout);
  vprintf (fmt, ap);
  putchar ('\n');
  fflush (stdout);
  funlockfile (stdout);
  va_end (ap);
}

static inline int
harness_status (int main_loop_rc)
{
  return main_loop_rc == 0 && atomic_load (&harness_errors) == 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- options */

enum harness_opt_kind {
  HARNESS_STRING,       /* const char **value */
  HARNESS_LONG,         /* long *value: a number >= 0 */
  HARNESS_SIZE,         /* uint64_t *value: a number > 0, K/M/G suffix */
  HARNESS_FLAG,         /* int *value set to 1; takes no argument */
  HARNESS_CALL,         /* call (VALUE), e.g. for repeated options */
};

struct harness_opt {
  const char *name;                 /* "--unix" */
  enum harness_opt_kind kind;
  void *value;
  void (*call) (const char *value);
};

static inline void
harness_usage (const char *usage)
{
  fprintf (stderr, "usage: %s %s\n", harness_name, usage);
  exit (2);
}

static inline long
harness_parse_long (const char *s)
{
  char *end;
  long n;

  errno = 0;
  n = strtol (s, &end, 0);
  if (errno || end == s || *end != '\0' || n < 0) {
    fprintf (stderr, "%s: bad number: %s\n", harness_name, s);
    exit (2);
  }
  return n;
}

static inline uint64_t
harness_parse_size (const char *s)
{
  char *end;
  unsigned long long n;

  errno = 0;
  n = strtoull (s, &end, 0);
  if (errno || end == s || *s == '-')
    goto bad;
  switch (*end) {
  case 'K': case 'k': n <<= 10; end++; break;
  case 'M': case 'm': n <<= 20; end++; break;
  case 'G': case 'g': n <<= 30; end++; break;
  default: break;
  }
  if (*end != '\0' || n == 0)
    goto bad;
  return n;
 bad:
  fprintf (stderr, "%s: bad size: %s\n", harness_name, s);
  exit (2);
}

/* opts ends with an entry whose name is NULL. */
static inline void
harness_parse (int argc, char *argv[], const struct harness_opt *opts,
               const char *usage)
{
  for (int i = 1; i < argc; i++) {
    const struct harness_opt *o;

    for (o = opts; o->name != NULL; o++)
      if (strcmp (argv[i], o->name) == 0)
        break;
    if (o->name == NULL)
      harness_usage (usage);
    if (o->kind == HARNESS_FLAG) {
      *(int *) o->value = 1;
      continue;
    }
    if (i + 1 >= argc)
      harness_usage (usage);
    const char *v = argv[++i];
    switch (o->kind) {
    case HARNESS_STRING: *(const char **) o->value = v; break;
    case HARNESS_LONG: *(long *) o->value = harness_parse_long (v); break;
    case HARNESS_SIZE: *(uint64_t *) o->value = harness_parse_size (v); break;
    case HARNESS_CALL: o->call (v); break;
    case HARNESS_FLAG: break;
    }
  }
}

/* ---------------------------------------------------------------- signals */

struct harness_signal_thread {
  pthread_t thread;
  int running;
  atomic_bool quit;
  void (*stop) (void);
  void (*usr1) (void);
  void (*usr2) (void);
};

static struct harness_signal_thread harness_sig;

static inline void *
harness_signal_loop (void *arg)
{
  sigset_t set;

  (void) arg;
  sigemptyset (&set);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGUSR1);
  sigaddset (&set, SIGUSR2);
  for (;;) {
    int sig;
    if (sigwait (&set, &sig) != 0)
      continue;
    if (atomic_load (&harness_sig.quit))
      return NULL;
    if (sig == SIGUSR1) {
      if (harness_sig.usr1)
        harness_sig.usr1 ();
    }
    else if (sig == SIGUSR2) {
      if (harness_sig.usr2)
        harness_sig.usr2 ();
    }
    else if (harness_sig.stop)
      harness_sig.stop ();
    else
      nbdkit_shutdown ();
  }
}

static inline void
harness_signals (void (*stop) (void), void (*usr1) (void), void (*usr2) (void))
{
  int r;

  harness_sig.stop = stop;
  harness_sig.usr1 = usr1;
  harness_sig.usr2 = usr2;
  r = pthread_create (&harness_sig.thread, NULL, harness_signal_loop, NULL);
  if (r != 0) {
    fprintf (stderr, "%s: pthread_create: %s\n", harness_name, strerror (r));
    exit (1);
  }
  harness_sig.running = 1;
}

static inline void
harness_signals_end (void)
{
  if (!harness_sig.running)
    return;
  atomic_store (&harness_sig.quit, true);
  pthread_kill (harness_sig.thread, SIGUSR2);
  pthread_join (harness_sig.thread, NULL);
  harness_sig.running = 0;
}

/* ---------------------------------------------------------------- server */

static inline int
harness_stats_line (nbdkit_server *srv, char *line, size_t size)
{
  struct nbdkit_stats st;
  int n;

  if (nbdkit_server_stats (srv, &st, sizeof st) != 0) {
    harness_error ("nbdkit_server_stats failed");
    return -1;
  }
  n = snprintf (line, size,
                "STATS connections=%" PRIu64 " connections_total=%" PRIu64
                " in_flight=%" PRIu64 " req=",
                st.connections, st.connections_total, st.requests_in_flight);
  for (int i = 0; i < 8; i++)
    n += snprintf (line + n, size - n, "%s%" PRIu64, i ? "," : "",
                   st.requests[i]);
  n += snprintf (line + n, size - n,
                 " bytes_read=%" PRIu64 " bytes_written=%" PRIu64
                 " errors=%" PRIu64 " lat=",
                 st.bytes_read, st.bytes_written, st.errors);
  for (int i = 0; i < 32; i++)
    n += snprintf (line + n, size - n, "%s%" PRIu64, i ? "," : "",
                   st.latency_us_log2[i]);
  return n;
}

static inline void
harness_print_stats (nbdkit_server *srv, const char *suffix)
{
  char line[2048];

  if (srv == NULL || harness_stats_line (srv, line, sizeof line) < 0)
    return;
  harness_say ("%s%s", line, suffix ? suffix : "");
}

static inline int
harness_listen (nbdkit_server *srv, const char *unix_path)
{
  int r = nbdkit_server_listen_unix (srv, unix_path);
  if (r < 0)
    fprintf (stderr, "%s: listen on %s: %s\n", harness_name, unix_path,
             strerror (-r));
  return r;
}

static inline int
harness_serve (nbdkit_server *srv, const char *unix_path)
{
  int r;

  if (harness_listen (srv, unix_path) < 0) {
    nbdkit_server_free (srv);
    return -1;
  }
  harness_say ("ready");
  r = nbdkit_main_loop (srv);
  harness_say ("main_loop returned %d", r);
  harness_signals_end ();       /* its callbacks may use the server */
  nbdkit_server_free (srv);
  return r;
}

#endif /* HARNESS_H */
