#!/usr/bin/env bash
# Builds Citus for the tests from the vendored source (../shared/vendor/, or $CITUS_VENDOR) and
# installs it into the system PostgreSQL 15. Skipped when that version is already installed.
# Exits 0 with a message (and writes nothing) when the vendored source is absent: the Citus
# tests then skip themselves, and `make test` stays green for a user without it.
#   scripts/citus.sh            build and install if needed
#   scripts/citus.sh --check    exit 0 when Citus is installed, 1 when not
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
VENDOR=${CITUS_VENDOR:-$ROOT/../shared/vendor}
VERSION=13.2.2
TARBALL=$VENDOR/citus-$VERSION.tar.gz
PATCH=$VENDOR/citus-$VERSION-pg15.20.patch
SHA256=dd2453caec20a830e5e63f1def5c5a98cb6f57ae510407cdcd800916fcdab430
BUILD=/var/tmp/pg_email-citus-$VERSION
STAMP="$($PG_CONFIG --pkglibdir)/citus.so.pg_email-$VERSION"

installed() { [ -f "$STAMP" ] && [ -f "$($PG_CONFIG --pkglibdir)/citus.so" ]; }

if [ "${1:-}" = "--check" ]; then installed; exit; fi
if installed; then echo "citus $VERSION: already installed"; exit 0; fi
if [ ! -f "$TARBALL" ]; then
    echo "citus: no vendored source at $TARBALL; the Citus tests will be skipped"
    exit 0
fi
echo "$SHA256  $TARBALL" | sha256sum -c --quiet -

# Its four libraries, and the tools a minimal Debian may lack.
deps="libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev gcc make patch"
missing=$(for p in $deps; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "citus: installing build dependencies:" $missing
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

echo "citus $VERSION: building from $TARBALL (about 3 minutes on two cores; log in $BUILD/build.log)"
rm -rf "$BUILD"; mkdir -p "$BUILD"
tar xzf "$TARBALL" -C "$BUILD"
src=$(find "$BUILD" -mindepth 1 -maxdepth 1 -type d | head -1)
(
    cd "$src"
    [ ! -f "$PATCH" ] || patch -s -p1 < "$PATCH"
    ./configure -q PG_CONFIG="$PG_CONFIG"
    make -s -j"$(nproc)"
    make -s install
) >"$BUILD/build.log" 2>&1 || { tail -40 "$BUILD/build.log"; echo "citus: build failed" >&2; exit 1; }
touch "$STAMP"
rm -rf "$src"
echo "citus $VERSION: installed"
