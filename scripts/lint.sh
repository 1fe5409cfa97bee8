#!/usr/bin/env bash
# lint.sh: the static checks of make lint and CI, all of which must be clean:
#   - shellcheck on every shell script of the repository (*.sh, *.bash, and
#     files with an sh or bash #! line; zsh and fish files are not sh);
#   - gofmt -l on every Go file;
#   - staticcheck ./... (STATICCHECK, default bin/tools/staticcheck);
#   - ansible-lint on deploy/ansible (the egress_snat role).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH=/usr/local/go/bin:$PATH
STATICCHECK=${STATICCHECK:-bin/tools/staticcheck}
case $STATICCHECK in /*) ;; */*) STATICCHECK=$ROOT/$STATICCHECK ;; esac # a relative path, from the root

# files lists the repository's files: git's list in a clone, else a walk.
files() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files
  else
    find . -path ./.git -prune -o -path ./bin -prune -o -path ./build -prune -o -type f -print | sed 's#^\./##'
  fi
}

shells=()
while IFS= read -r f; do
  [[ -f $f ]] || continue
  case $f in
    *.sh | *.bash) shells+=("$f") ;;
    *.go | *.md | *.yaml | *.yml | *.fish | *.8 | _*) ;;
    *) if head -n1 "$f" | grep -Eq '^#!.*[/ ](ba|da)?sh\b'; then shells+=("$f"); fi ;;
  esac
done < <(files)
echo "== shellcheck: ${#shells[@]} scripts =="
printf '   %s\n' "${shells[@]}"
shellcheck -x "${shells[@]}" # -x: follow the sourced scripts/benchlib.sh

echo "== gofmt =="
mapfile -t gofiles < <(files | grep '\.go$')
unformatted=$(gofmt -l "${gofiles[@]}")
if [[ -n $unformatted ]]; then
  echo "not gofmt-ed (run make fmt):" >&2
  echo "$unformatted" >&2
  exit 1
fi

echo "== staticcheck $("$STATICCHECK" -version) =="
"$STATICCHECK" ./...
(cd deploy/kubernetes && "$STATICCHECK" ./...) # a module of its own
echo "== ansible-lint (deploy/ansible) =="
(cd deploy/ansible && ansible-lint --profile production --nocolor)

echo "lint: clean"
