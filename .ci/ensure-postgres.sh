#!/usr/bin/env bash
# Makes PostgreSQL's server binaries available for the end-to-end tests (the test fixture runs
# initdb/pg_ctl itself, on 127.0.0.1, in a temporary directory). Installs Debian's `postgresql`
# package when running as root with apt-get; otherwise does nothing (the PostgreSQL test then
# skips, saying why). Never fails the build by itself.
set -u
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    echo "installing postgresql (Debian package) for the end-to-end tests" >&2
    apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1; } \
        || echo "could not install postgresql; its test will skip" >&2
fi
exit 0
