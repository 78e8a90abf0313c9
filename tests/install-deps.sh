#!/bin/sh
# Installs the real NBD peers the tests talk to, from Debian packages.
# As root it runs apt-get; otherwise it says what to install.
set -e
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo   || need="$need libnbd-bin"
have nbdkit    || need="$need nbdkit"
have qemu-img  || need="$need qemu-utils"
have fio       || need="$need fio"
have valgrind  || need="$need valgrind"
have g++       || need="$need g++"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need="$need python3-libnbd"
/usr/bin/python3 -c 'import pytest' 2>/dev/null || need="$need python3-pytest"
[ -e /usr/include/boost/asio.hpp ] || need="$need libboost-dev"
[ -e /usr/include/openssl/ssl.h ] || need="$need libssl-dev"
# The manual pages are checked by rendering them.
have man       || need="$need man-db"
have groff     || need="$need groff-base"
# A throw-away Ceph cluster (tests/ceph.py) and librbd to build against
# (no pkg-config file: link with -lrbd -lrados).
have ceph-mon  || need="$need ceph-mon"
have ceph-osd  || need="$need ceph-osd"
{ have ceph && have rbd; } || need="$need ceph-common"
[ -e /usr/include/rbd/librbd.h ] || need="$need librbd-dev"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    echo "installing:$need"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need
else
    echo "missing test tools; install them with:"
    echo "  sudo apt-get install$need"
    exit 1
fi
