#!/usr/bin/env bash
# System packages some tests use, from Debian: PostgreSQL's server binaries (the end-to-end test
# runs initdb/pg_ctl itself on 127.0.0.1 in a temporary directory) and Chromium (the report is
# opened headless to check that every figure renders). Installed when running as root with
# apt-get; otherwise nothing happens and those tests skip, saying why. Never fails the build.
set -u
need=()
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    echo "installing ${need[*]} (Debian packages) for the tests" >&2
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1; } \
        || echo "could not install ${need[*]}; the tests that need them will skip" >&2
fi
exit 0
