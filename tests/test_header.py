"""The public header compiles on its own, as C99 and as C++17, with every
warning turned into an error; including it twice is harmless; and a C or
C++ program that uses every declaration links against the library."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "include"
HEADER = INCLUDE / "nbdkit-async.h"
STATICLIB = ROOT / "target" / "release" / "libnbdkit_async.a"
LIBS = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]

CC = os.environ.get("CC", "cc")
CXX = os.environ.get("CXX", "g++")
WARN = ["-Wall", "-Wextra", "-Werror", "-pedantic"]

ONCE = "#include <nbdkit-async.h>\n"
TWICE = "#include <nbdkit-async.h>\n#include <nbdkit-async.h>\n"

# Uses every type, macro and function of the header. Valid C99 and C++17.
USE_ALL = r"""
#include <nbdkit-async.h>
#include <stddef.h>
#include <stdint.h>

static void *my_open (void *user_data, int readonly, const char *export_name)
{ (void) readonly; (void) export_name; return user_data; }
static void my_close (void *h) { (void) h; }
static int64_t my_get_size (void *h) { (void) h; return 1 << 20; }
static int my_can (void *h) { (void) h; return 1; }
static int my_can_fua (void *h) { (void) h; return NBDKIT_FUA_NATIVE; }
static int my_pread (nbdkit_op *op, void *h, void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{ (void) h; (void) buf; (void) count; (void) offset; (void) flags;
  return nbdkit_reply (op); }
static int my_pwrite (nbdkit_op *op, void *h, const void *buf, uint32_t count,
                      uint64_t offset, uint32_t flags)
{ (void) h; (void) buf; (void) count; (void) offset;
  if (flags & NBDKIT_FLAG_FUA) return nbdkit_reply (op);
  return nbdkit_reply_error (op, 5); }
static int my_flush (nbdkit_op *op, void *h, uint32_t flags)
{ (void) h; (void) flags; return nbdkit_reply_read (op, NULL, 0); }
static int my_range (nbdkit_op *op, void *h, uint32_t count, uint64_t offset,
                     uint32_t flags)
{ (void) h; (void) count; (void) offset;
  if (flags & NBDKIT_FLAG_MAY_TRIM) return nbdkit_reply (op);
  return nbdkit_reply (op); }

int main (void)
{
  struct nbdkit_plugin_lowlevel p;
  nbdkit_plugin_lowlevel *q = &p;
  nbdkit_server *srv;
  int fua[3] = { NBDKIT_FUA_NONE, NBDKIT_FUA_EMULATE, NBDKIT_FUA_NATIVE };

  p.name = "use-all";
  p.open = my_open;
  p.close = my_close;
  p.get_size = my_get_size;
  p.can_write = my_can;
  p.can_flush = my_can;
  p.can_trim = my_can;
  p.can_zero = my_can;
  p.can_fua = my_can_fua;
  p.can_multi_conn = my_can;
  p.can_cache = my_can;
  p.pread = my_pread;
  p.pwrite = my_pwrite;
  p.flush = my_flush;
  p.trim = my_range;
  p.zero = my_range;
  p.cache = my_range;
  (void) fua;

  srv = nbdkit_server_new (q, sizeof p, NULL);
  if (srv == NULL)
    return 1;
  if (nbdkit_server_set_readonly (srv, 0) != 0) return 1;
  if (nbdkit_server_set_export_name (srv, "") != 0) return 1;
  if (nbdkit_server_set_export_description (srv, NULL) != 0) return 1;
  if (nbdkit_server_set_max_inflight (srv, 16) != 0) return 1;
  if (nbdkit_server_set_max_inflight (srv, 0) == 0) return 1;
  if (0) {
    (void) nbdkit_server_listen_unix (srv, "/nonexistent/sock");
    (void) nbdkit_server_listen_tcp (srv, NULL, 0);
    (void) nbdkit_main_loop (srv);
  }
  (void) nbdkit_server_shutdown (srv);
  nbdkit_shutdown ();
  nbdkit_server_free (srv);
  nbdkit_server_free (NULL);
  return 0;
}
"""


def compile_ok(argv, cwd):
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (
        "command failed: %s\n--- stdout\n%s\n--- stderr\n%s" % (" ".join(map(str, argv)), r.stdout, r.stderr))
    return r


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail("%s is not installed (tests/install-deps.sh installs it)" % tool)


def test_header_exists():
    assert HEADER.is_file(), HEADER


@pytest.mark.parametrize("text", [ONCE, TWICE], ids=["once", "twice"])
def test_header_alone_c99(tmp_path, text):
    need(CC)
    src = tmp_path / "inc.c"
    src.write_text(text)
    compile_ok([CC, "-std=c99", *WARN, "-fsyntax-only", "-I", str(INCLUDE), str(src)], tmp_path)


@pytest.mark.parametrize("text", [ONCE, TWICE], ids=["once", "twice"])
def test_header_alone_cxx17(tmp_path, text):
    need(CXX)
    src = tmp_path / "inc.cpp"
    src.write_text(text)
    compile_ok([CXX, "-std=c++17", *WARN, "-c", "-o", str(tmp_path / "inc.o"),
                "-I", str(INCLUDE), str(src)], tmp_path)


@pytest.mark.parametrize("lang", ["c99", "c++17"])
def test_header_declarations_link_and_run(tmp_path, lang):
    """Every declaration is usable from C and C++ (extern "C" linkage, names
    present in the library), and the set-up calls behave as documented."""
    if not STATICLIB.is_file():
        pytest.fail("%s is missing: run `make lib` first" % STATICLIB)
    if lang == "c99":
        need(CC)
        src = tmp_path / "use.c"
        compiler = [CC, "-std=c99"]
    else:
        need(CXX)
        src = tmp_path / "use.cpp"
        compiler = [CXX, "-std=c++17"]
    src.write_text(USE_ALL)
    exe = tmp_path / "use"
    compile_ok([*compiler, *WARN, "-I", str(INCLUDE), "-pthread", "-o", str(exe), str(src),
                str(STATICLIB), *LIBS], tmp_path)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, "use-all program failed (%d)\n--- stderr\n%s" % (r.returncode, r.stderr)
