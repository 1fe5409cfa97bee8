#!/usr/bin/env bash
# deb.sh: build the Debian package into build/deb/ with nfpm (make deb).
# The version comes from git describe, made a valid Debian version:
#   tag v1.2.3 exactly       -> 1.2.3
#   5 commits after v1.2.3   -> 1.2.3+git5.abc1234
#   no tag                   -> 0.0.0~gitN.abc1234 (N commits on HEAD)
#   uncommitted changes      -> +dirty appended
# Prints the path of the .deb on the last line.
#
# Environment: NFPM (default bin/tools/nfpm), GO (default go), GOARCH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH=/usr/local/go/bin:$PATH
NFPM=${NFPM:-bin/tools/nfpm}
GO=${GO:-go}

deb_version() {
  local hash desc tag n v
  hash=$(git rev-parse --short=7 HEAD)
  if desc=$(git describe --tags --long --match 'v[0-9]*' 2>/dev/null); then
    tag=${desc%-*-g*}          # v1.2.3 (or v1.2.3-rc1)
    n=${desc%-g*}; n=${n##*-}  # commits since the tag
    v=${tag#v}; v=${v//-/\~}   # a pre-release sorts before the release
    ((n == 0)) || v+="+git$n.$hash"
  else
    v="0.0.0~git$(git rev-list --count HEAD).$hash"
  fi
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then v+="+dirty"; fi
  echo "$v"
}

VERSION=$(deb_version)
GITVERSION=$(git describe --tags --always --dirty)
ARCH=${GOARCH:-$("$GO" env GOARCH)}
OUT=build/deb
STAGE=$OUT/stage
export VERSION ARCH STAGE
rm -rf "$STAGE"
mkdir -p "$STAGE"

# Stripped: lintian wants no debug symbols in /usr/sbin. PIE: hardening, and
# lintian takes a plain static Go binary for an error (statically-linked-
# binary; it exempts Go only when it sees a golang source package). A Go
# PIE needs no shared library, which lintian notes as a warning
# (shared-library-lacks-prerequisites).
CGO_ENABLED=0 GOARCH=$ARCH "$GO" build -trimpath -buildmode=pie \
  -ldflags "-s -w -X main.version=$GITVERSION" -o "$STAGE/egress-snat" ./cmd/egress-snat

# Debian wants man pages and changelogs compressed with gzip -9n (no name or
# timestamp inside, so the package is reproducible).
gzip -9n <docs/man/egress-snat.8 >"$STAGE/egress-snat.8.gz"

# The units in scripts/systemd are written for a source install into
# /usr/local/sbin; the package installs into /usr/sbin.
for u in egress-snat.service egress-snat-rotate.service egress-snat-rotate.timer; do
  {
    echo "# Installed by the egress-snat package; override with systemctl edit ${u}."
    sed '/^Exec/s#/usr/local/sbin/egress-snat#/usr/sbin/egress-snat#g' "scripts/systemd/$u"
  } >"$STAGE/$u"
done
cp scripts/cron/egress-snat "$STAGE/cron"

# A native package's changelog: one entry for the commit it was built from,
# dated by the commit so that two builds of one commit are identical.
{
  echo "egress-snat ($VERSION) unstable; urgency=medium"
  echo
  echo "  * Built from git $GITVERSION, commit"
  echo "    $(git rev-parse HEAD)."
  echo
  echo " -- egress-snat developers <egress-snat@users.noreply.github.com>  $(git log -1 --format=%cD)"
} | gzip -9n >"$STAGE/changelog.gz"

deb=$OUT/egress-snat_${VERSION}_${ARCH}.deb
rm -f "$OUT"/egress-snat_*.deb # one package in build/deb: the one just built
"$NFPM" package --config packaging/nfpm.yaml --packager deb --target "$deb" >&2
echo "$deb"
