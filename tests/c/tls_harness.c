/* tls_harness: a TLS server whose plugin does access control on the
 * client certificate, for tests/test_tls.py.
 *
 * The plugin's `open` asks nbdkit_tls_peer_certificate for the verified
 * client certificate, computes its SHA-256 fingerprint (the DER, as
 * `openssl x509 -fingerprint -sha256` does) and admits the client only if
 * the fingerprint is on the allow list. Without any --allow every client is
 * admitted (the fingerprint, or "none", is still printed).
 *
 *   tls_harness --unix PATH --tls-certificates DIR [--tls on|require]
 *               [--verify-peer] [--allow FINGERPRINT]...
 *
 * FINGERPRINT is colon-separated hex (as openssl prints it); case is
 * ignored. The export is 1 MiB, read-only, reading byte (offset % 251) + 1.
 *
 * stdout: "ready" once listening; per open
 *   "open EXPORT cert FINGERPRINT|none len N verdict allow|refuse"
 * "close" per handle; "main_loop returned R" at the end. Self-check
 * failures go to stderr as "HARNESS-ERROR" (e.g. a certificate visible
 * outside `open`, or a DER that is not an ASN.1 SEQUENCE).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-async.h>

#include "harness.h"

#define DISK_SIZE (1u << 20)
#define MAX_ALLOW 16

static const char *allow[MAX_ALLOW];
static int nallow;

/* ---------------------------------------------------------------------
 * SHA-256 (FIPS 180-4), small and self-contained.
 */
static const uint32_t K[64] = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
  0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
  0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
  0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void
sha256_block (uint32_t h[8], const unsigned char *p)
{
  uint32_t w[64];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t) p[4 * i] << 24 | (uint32_t) p[4 * i + 1] << 16 |
      (uint32_t) p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = ROR (w[i - 15], 7) ^ ROR (w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ROR (w[i - 2], 17) ^ ROR (w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
  uint32_t e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = hh + (ROR (e, 6) ^ ROR (e, 11) ^ ROR (e, 25)) +
      ((e & f) ^ (~e & g)) + K[i] + w[i];
    uint32_t t2 = (ROR (a, 2) ^ ROR (a, 13) ^ ROR (a, 22)) +
      ((a & b) ^ (a & c) ^ (b & c));
    hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h[0] += a; h[1] += b; h[2] += c; h[3] += d;
  h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

static void
sha256 (const unsigned char *data, size_t len, unsigned char out[32])
{
  uint32_t h[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  };
  size_t i = 0;
  for (; i + 64 <= len; i += 64)
    sha256_block (h, data + i);
  unsigned char tail[128] = { 0 };
  size_t rest = len - i;
  memcpy (tail, data + i, rest);
  tail[rest] = 0x80;
  size_t tlen = rest + 1 + 8 <= 64 ? 64 : 128;
  uint64_t bits = (uint64_t) len * 8;
  for (int k = 0; k < 8; k++)
    tail[tlen - 1 - k] = (unsigned char) (bits >> (8 * k));
  sha256_block (h, tail);
  if (tlen == 128)
    sha256_block (h, tail + 64);
  for (int k = 0; k < 8; k++) {
    out[4 * k] = (unsigned char) (h[k] >> 24);
    out[4 * k + 1] = (unsigned char) (h[k] >> 16);
    out[4 * k + 2] = (unsigned char) (h[k] >> 8);
    out[4 * k + 3] = (unsigned char) h[k];
  }
}

/* "AB:CD:..." as openssl prints it: 32 bytes -> 95 characters + NUL. */
static void
fingerprint (const unsigned char *der, size_t len, char out[96])
{
  unsigned char digest[32];
  sha256 (der, len, digest);
  for (int i = 0; i < 32; i++)
    sprintf (out + 3 * i, "%02X%s", digest[i], i < 31 ? ":" : "");
}

static int
allowed (const char *fp)
{
  if (nallow == 0)
    return 1;
  for (int i = 0; i < nallow; i++)
    if (strcasecmp (allow[i], fp) == 0)
      return 1;
  return 0;
}

/* The certificate must be visible in `open` only. */
static void
check_no_certificate (const char *where)
{
  size_t len = 12345;
  const uint8_t *cert = nbdkit_tls_peer_certificate (&len);
  if (cert != NULL)
    harness_error ("peer certificate visible in %s (%zu bytes)", where, len);
}

/* ---------------------------------------------------------------------
 * The plugin.
 */
static void *
th_open (void *user_data, int readonly, const char *export_name)
{
  (void) user_data; (void) readonly;
  size_t len = 0;
  const uint8_t *cert = nbdkit_tls_peer_certificate (&len);
  /* The len argument is optional. */
  if (nbdkit_tls_peer_certificate (NULL) != cert)
    harness_error ("nbdkit_tls_peer_certificate (NULL) differs");
  char fp[96] = "none";
  if (cert != NULL) {
    if (len < 2 || cert[0] != 0x30)
      harness_error ("peer certificate is not a DER SEQUENCE");
    fingerprint (cert, len, fp);
  }
  else if (len != 0)
    harness_error ("no certificate but len != 0");
  int ok = cert != NULL ? allowed (fp) : nallow == 0;
  printf ("open %s cert %s len %zu verdict %s\n",
          export_name[0] ? export_name : "\"\"", fp, len,
          ok ? "allow" : "refuse");
  fflush (stdout);
  if (!ok) {
    errno = EACCES;
    return NULL;
  }
  static int token;
  return &token;
}

static void
th_close (void *h)
{
  (void) h;
  check_no_certificate ("close");
  printf ("close\n");
  fflush (stdout);
}

static int64_t
th_get_size (void *h)
{
  (void) h;
  check_no_certificate ("get_size");
  return DISK_SIZE;
}

static int
th_pread (nbdkit_op *op, void *h, void *buf, uint32_t count, uint64_t offset,
          uint32_t flags)
{
  (void) h; (void) flags;
  check_no_certificate ("pread");
  unsigned char *p = buf;
  for (uint32_t i = 0; i < count; i++)
    p[i] = (unsigned char) ((offset + i) % 251 + 1);
  if (nbdkit_reply (op) != 0)
    harness_error ("nbdkit_reply failed");
  return 0;
}

static const struct nbdkit_plugin_lowlevel plugin = {
  .name = "tls_harness",
  .open = th_open,
  .close = th_close,
  .get_size = th_get_size,
  .pread = th_pread,
};

static int tls_mode = NBDKIT_TLS_REQUIRE;
static const char usage[] = "--unix PATH --tls-certificates DIR "
  "[--tls on|require] [--verify-peer] [--allow FINGERPRINT]...";

static void
opt_tls (const char *v)
{
  if (strcmp (v, "on") == 0)
    tls_mode = NBDKIT_TLS_ALLOW;
  else if (strcmp (v, "require") == 0)
    tls_mode = NBDKIT_TLS_REQUIRE;
  else
    harness_usage (usage);
}

static void
opt_allow (const char *v)
{
  if (nallow == MAX_ALLOW)
    harness_usage (usage);
  allow[nallow++] = v;
}

int
main (int argc, char *argv[])
{
  const char *unix_path = NULL, *dir = NULL;
  int verify = 0;
  const struct harness_opt opts[] = {
    { "--unix", HARNESS_STRING, &unix_path, NULL },
    { "--tls-certificates", HARNESS_STRING, &dir, NULL },
    { "--tls", HARNESS_CALL, NULL, opt_tls },
    { "--verify-peer", HARNESS_FLAG, &verify, NULL },
    { "--allow", HARNESS_CALL, NULL, opt_allow },
    { NULL, 0, NULL, NULL },
  };

  harness_init ("tls_harness");
  harness_parse (argc, argv, opts, usage);
  if (unix_path == NULL || dir == NULL)
    harness_usage (usage);

  /* Outside any connection there is no certificate either. */
  check_no_certificate ("main");

  nbdkit_server *srv = nbdkit_server_new (&plugin, sizeof plugin, NULL);
  if (srv == NULL) {
    harness_error ("nbdkit_server_new failed");
    return 1;
  }
  if (nbdkit_server_set_tls_certificates (srv, dir) != 0 ||
      nbdkit_server_set_tls (srv, tls_mode) != 0 ||
      nbdkit_server_set_tls_verify_peer (srv, verify) != 0) {
    harness_error ("TLS set-up failed");
    nbdkit_server_free (srv);
    return 1;
  }
  harness_signals (NULL, NULL, NULL);
  return harness_status (harness_serve (srv, unix_path));
}
