#!/bin/sh
# Installs the system programs some tests need (redis-server for the Redis state store, chromium
# for the browser tests) when they are missing and this user may install packages (root or
# passwordless sudo, with apt-get). Otherwise says in one line which tests will skip, and why.
# Never fails the build: the tests decide (under CI=true a missing service fails them).
set -u

missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
case "$missing" in
    "") exit 0 ;;
    *redis-server*chromium*) skipped="Redis and browser" ;;
    *redis-server*) skipped="Redis" ;;
    *) skipped="browser" ;;
esac

if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    echo "system-deps:$missing missing and not root (no passwordless sudo): the $skipped tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps:$missing missing and no apt-get here: the $skipped tests will skip"
    exit 0
fi

echo "system-deps: installing$missing with apt-get"
if $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq $missing >/dev/null; then
    exit 0
fi
echo "system-deps: apt-get could not install$missing: the $skipped tests will skip"
exit 0
