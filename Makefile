# libnbdkit-async: build the library and examples, run the tests.
#
#   make          release library + every example into build/
#   make demo     serve the async memdisk example on a Unix socket
#   make check    install missing test tools (as root), then run every test
#   make install  PREFIX=/usr/local DESTDIR=... (stripped; make install-debug, make uninstall)
#   make bench    side-by-side benchmark against nbdkit and qemu-nbd
#   make bench-rbd  rbd-gateway against librbd on a throw-away Ceph cluster
#   make soak     long fio verify run against memdisk (SOAK_SECONDS)
#   make fuzz     long randomized run of the protocol parsers (FUZZ_ITERATIONS)

CARGO    ?= cargo
CC       ?= cc
CXX      ?= g++
BUILD    := build
LIBDIR   := target/release
STATICLIB := $(LIBDIR)/libnbdkit_async.a
HEADER   := include/nbdkit-async.h

VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
SOMAJOR  := 0
SONAME_FILE := libnbdkit_async.so.$(VERSION)
PREFIX   ?= /usr/local
LIBDIR_INSTALL ?= $(PREFIX)/lib
INCDIR_INSTALL ?= $(PREFIX)/include
MANDIR_INSTALL ?= $(PREFIX)/share/man
# What the Rust standard library needs when linked statically.
PRIVATE_LIBS := -lutil -lrt -lpthread -lm -ldl

WARN     := -Wall -Wextra -Werror -pedantic
CFLAGS   ?= -O2 -g
CFLAGS   += -std=c11 $(WARN) -Iinclude -pthread
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++17 $(WARN) -Iinclude -pthread
LIBS     := $(STATICLIB) $(PRIVATE_LIBS)

EXAMPLES := $(patsubst c-examples/%.c,$(BUILD)/%,$(wildcard c-examples/*.c)) \
            $(patsubst cpp-examples/%.cpp,$(BUILD)/%,$(wildcard cpp-examples/*.cpp))
# The Ceph RBD gateway needs librbd-dev (`make check` installs it).
ifeq ($(wildcard /usr/include/rbd/librbd.h),)
EXAMPLES := $(filter-out $(BUILD)/rbd-gateway,$(EXAMPLES))
endif
PYTHON   := /usr/bin/python3
DEMO_SOCK := $(BUILD)/demo.sock
# The manual pages, made from the header's doc comments (one rule writes them all).
MANPAGE  := $(BUILD)/man/nbdkit-async.3

.PHONY: all lib install install-debug uninstall demo check check-deps check-header lint unit-test integration-test bench bench-rbd soak fuzz clean

all: $(EXAMPLES) $(MANPAGE)

lib: $(STATICLIB)

# Cargo tracks its own dependencies; always ask it.
$(STATICLIB): FORCE
	$(CARGO) build --release --quiet

# build.rs writes the header into cargo's (hashed) OUT_DIR; the newest one
# is copied over the committed header only when it differs.
GENERATED_HEADER = $(firstword $(shell ls -t $(LIBDIR)/build/nbdkit_async-*/out/nbdkit-async.h 2>/dev/null))
$(HEADER): $(STATICLIB)
	@cmp -s $(GENERATED_HEADER) $@ || cp $(GENERATED_HEADER) $@

$(BUILD)/%: c-examples/%.c $(STATICLIB) $(HEADER) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ $< $(LIBS) $(LDLIBS_EXTRA)

$(BUILD)/%: cpp-examples/%.cpp $(STATICLIB) $(HEADER) $(wildcard include/*.hpp) | $(BUILD)
	$(CXX) $(CXXFLAGS) -o $@ $< $(LIBS) $(LDLIBS_EXTRA)

# The gateway speaks TLS to its upstream with boost::asio::ssl (OpenSSL).
$(BUILD)/asio-gateway: LDLIBS_EXTRA := -lssl -lcrypto
# librbd-dev ships no pkg-config file.
$(BUILD)/rbd-gateway: LDLIBS_EXTRA := -lrbd -lrados

$(BUILD):
	mkdir -p $@

$(MANPAGE): $(HEADER) man/mkman.py man/nbdkit-async.3.in | $(BUILD)
	rm -rf $(BUILD)/man
	$(PYTHON) man/mkman.py --header $(HEADER) $(BUILD)/man

# Directories under PREFIX are written relative to ${prefix}, so that
# pkg-config --define-variable=prefix=... moves them all.
pc_rel = $(patsubst $(PREFIX)%,$${prefix}%,$(1))
# Rebuilt every time: it records PREFIX, which may differ from the last run.
$(BUILD)/nbdkit-async.pc: nbdkit-async.pc.in FORCE | $(BUILD)
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(call pc_rel,$(LIBDIR_INSTALL))|' \
	    -e 's|@INCLUDEDIR@|$(call pc_rel,$(INCDIR_INSTALL))|' \
	    -e 's|@VERSION@|$(VERSION)|; s|@PRIVATE_LIBS@|$(PRIVATE_LIBS)|' $< > $@

# Where gdb looks for the debug info of $(LIBDIR_INSTALL)/$(SONAME_FILE).
DEBUGDIR_INSTALL ?= $(PREFIX)/lib/debug$(LIBDIR_INSTALL)

# Installed stripped, as distributions ship libraries; the debug info the
# release build keeps goes to `make install-debug`.
install: lib $(BUILD)/nbdkit-async.pc $(LIBDIR)/$(SONAME_FILE).debug $(MANPAGE)
	install -d $(DESTDIR)$(LIBDIR_INSTALL)/pkgconfig $(DESTDIR)$(INCDIR_INSTALL)
	install -m 644 $(STATICLIB) $(DESTDIR)$(LIBDIR_INSTALL)/
	strip --strip-debug $(DESTDIR)$(LIBDIR_INSTALL)/libnbdkit_async.a
	install -m 755 $(LIBDIR)/libnbdkit_async.so $(DESTDIR)$(LIBDIR_INSTALL)/$(SONAME_FILE)
	objcopy --strip-unneeded --add-gnu-debuglink=$(LIBDIR)/$(SONAME_FILE).debug \
	    $(DESTDIR)$(LIBDIR_INSTALL)/$(SONAME_FILE)
	ln -sf $(SONAME_FILE) $(DESTDIR)$(LIBDIR_INSTALL)/libnbdkit_async.so.$(SOMAJOR)
	ln -sf libnbdkit_async.so.$(SOMAJOR) $(DESTDIR)$(LIBDIR_INSTALL)/libnbdkit_async.so
	install -m 644 $(HEADER) $(wildcard include/*.hpp) $(DESTDIR)$(INCDIR_INSTALL)/
	install -m 644 $(BUILD)/nbdkit-async.pc $(DESTDIR)$(LIBDIR_INSTALL)/pkgconfig/
	install -d $(DESTDIR)$(MANDIR_INSTALL)/man3
	install -m 644 $(BUILD)/man/*.3 $(DESTDIR)$(MANDIR_INSTALL)/man3/

# The shared library's debug info, where gdb finds it by the debuglink
# `make install` wrote.
$(LIBDIR)/$(SONAME_FILE).debug: $(STATICLIB)
	objcopy --only-keep-debug $(LIBDIR)/libnbdkit_async.so $@

install-debug: $(LIBDIR)/$(SONAME_FILE).debug
	install -d $(DESTDIR)$(DEBUGDIR_INSTALL)
	install -m 644 $< $(DESTDIR)$(DEBUGDIR_INSTALL)/$(SONAME_FILE).debug

uninstall:
	rm -f $(DESTDIR)$(LIBDIR_INSTALL)/libnbdkit_async.a $(DESTDIR)$(LIBDIR_INSTALL)/libnbdkit_async.so*
	rm -f $(DESTDIR)$(INCDIR_INSTALL)/nbdkit-async.h $(DESTDIR)$(INCDIR_INSTALL)/nbdkit-async.hpp
	rm -f $(DESTDIR)$(LIBDIR_INSTALL)/pkgconfig/nbdkit-async.pc
	rm -f $(DESTDIR)$(DEBUGDIR_INSTALL)/$(SONAME_FILE).debug
	files=$$($(PYTHON) man/mkman.py --header $(HEADER) --list) && \
	  for f in $$files; do rm -f "$(DESTDIR)$(MANDIR_INSTALL)/man3/$$f"; done

# The first command on a fresh machine: builds the library (cargo shows
# its progress) and memdisk alone, which needs nothing but a C compiler.
demo:
	$(CARGO) build --release
	@$(MAKE) --no-print-directory $(BUILD)/memdisk
	@echo "Serving a 1 GiB in-memory disk with 10 ms of latency at the URI below;"
	@echo "try: nbdinfo URI, or qemu-img info URI. Ctrl-C stops it."
	@$(BUILD)/memdisk --unix $(abspath $(DEMO_SOCK)) --size 1G --latency-ms 10

# The dependencies first, in a make of their own: what they install (the
# Ceph headers) decides which examples this Makefile builds.
check: check-deps
	$(MAKE) all check-header lint unit-test integration-test

check-deps:
	@tests/install-deps.sh

# The committed header must be what build.rs generates from the sources;
# the code must be formatted and free of clippy's warnings.
check-header: $(HEADER)
	@git diff --exit-code -- $(HEADER) || \
	  { echo "$(HEADER) is stale: commit the regenerated header"; exit 1; }

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --quiet --all-targets -- -D warnings

unit-test:
	$(CARGO) test --quiet

# The memdisk modules run a second time with two event loops per server.
LOOP_TESTS := tests/test_memdisk_clients.py tests/test_memdisk_protocol.py \
              tests/test_memdisk_concurrency.py tests/test_memdisk_lifecycle.py \
              tests/test_extended_headers.py tests/test_hostile.py
integration-test: all
	$(PYTHON) -m pytest -q tests
	MEMDISK_LOOPS=2 $(PYTHON) -m pytest -q $(LOOP_TESTS)

bench: check-deps all
	$(PYTHON) bench/run.py

# rbd-gateway against librbd on a throw-away Ceph cluster (bench/rbd.py).
bench-rbd: check-deps
	$(MAKE) all
	$(PYTHON) bench/rbd.py

SOAK_SECONDS ?= 600
soak: check-deps all
	tests/soak.sh $(SOAK_SECONDS)

FUZZ_ITERATIONS ?= 2000000
fuzz:
	NBDKIT_ASYNC_FUZZ_ITERATIONS=$(FUZZ_ITERATIONS) $(CARGO) test --release --lib protocol::fuzz

clean:
	$(CARGO) clean
	rm -rf $(BUILD)

FORCE:
