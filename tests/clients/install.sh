#!/bin/sh
# Installs the build tools the client suite (tests/clients.rs) drives, when
# they are missing: Debian packages, as root, non-interactively.
#
#   ccache                4.7.5 on Debian 12
#   gradle                4.4.1 (Debian's build, patched to run on OpenJDK 17)
#   default-jdk-headless  OpenJDK 17: javac for Gradle's compileJava
#   bazel-bootstrap       4.2.3, runs offline with the stand-ins in bazel/standins
#   gcc, libc6-dev        the C compiler ccache and Bazel's cc rules call
#   libnetty-tcnative-jni OpenSSL for Bazel's grpcs:// (tests/clients.rs says why)
#
# Exit status: 0 when everything is present (installed now or before), 3 when
# something is missing and cannot be installed here (not root, no apt-get, or
# apt-get failed); the suite then skips those clients and says why.
set -u

missing=""
command -v ccache >/dev/null 2>&1 || missing="$missing ccache"
command -v gradle >/dev/null 2>&1 || missing="$missing gradle"
command -v javac >/dev/null 2>&1 || missing="$missing default-jdk-headless"
command -v bazel-4 >/dev/null 2>&1 || command -v bazel >/dev/null 2>&1 ||
    missing="$missing bazel-bootstrap"
command -v gcc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
# Debian's Bazel needs netty-tcnative for grpcs:// (its JDK ALPN support is patched out).
tcnative=""
for lib in /usr/lib/*/jni/libnetty-tcnative.so /usr/lib/jni/libnetty-tcnative.so; do
    [ -e "$lib" ] && tcnative="$lib"
done
[ -n "$tcnative" ] || missing="$missing libnetty-tcnative-jni"

if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "client suite: missing$missing; not root, so not installing them" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "client suite: missing$missing; no apt-get on this machine" >&2
    exit 3
fi

echo "client suite: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Other jobs on the machine may hold the dpkg lock for a while: wait for it.
lock="-o DPkg::Lock::Timeout=600"
# shellcheck disable=SC2086 # word splitting of $missing and $lock is intended
if apt-get $lock update -q && apt-get $lock install -y -q $missing; then
    exit 0
fi
echo "client suite: apt-get could not install$missing" >&2
exit 3
