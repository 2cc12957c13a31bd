#!/usr/bin/env bash
# The vendored Pingora crates are the pristine crates.io sources plus vendor/patches/*.patch,
# nothing else. This script checks that, and re-vendors on a new Pingora version.
#
#   vendor/vendor.sh check     each vendor/CRATE minus its patches (reverse-applied, newest
#                              first) must hash to the pristine tree recorded in
#                              vendor/pristine.sha256 (offline; `cargo test --test vendor` runs it)
#   vendor/vendor.sh refresh   copy each crate named in vendor/pristine.sha256 from cargo's
#                              registry cache (~/.cargo/registry/src; `cargo fetch` first, with
#                              the [patch.crates-io] section commented out), apply the patches
#                              in order, and record the pristine hashes anew. Stops at the first
#                              patch that does not apply: port it by hand, regenerate it with
#                              `vendor.sh diff CRATE`, and rerun.
#   vendor/vendor.sh diff CRATE  what vendor/CRATE changes beyond the registry's pristine CRATE
#                              plus its existing patches: the body of a new .patch file
#                              (`patch -p1` in the crate directory; timestamps dropped, a file
#                              added or removed named /dev/null on its missing side)
#
# A patch names its crate in a `Crate: NAME` line of its header (the text before the diff,
# which `patch` skips). pristine.sha256 lines are `HASH NAME VERSION`; the hash is of the file
# list and contents (sha256sum over the sorted files, cargo's `.cargo-ok` marker excluded).
set -euo pipefail
VENDOR="$(cd "$(dirname "$0")" && pwd)"
PRISTINE="$VENDOR/pristine.sha256"
REGISTRY="${CARGO_HOME:-$HOME/.cargo}/registry/src"

die() { echo "vendor.sh: $*" >&2; exit 1; }

tree_hash() {
  (cd "$1" && find . -type f ! -name .cargo-ok -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) |
    sha256sum | cut -d' ' -f1
}

# The patch files for crate $1, in order.
patches_of() {
  local p
  for p in "$VENDOR"/patches/*.patch; do
    [ -e "$p" ] || continue
    if grep -qx "Crate: $1" "$p"; then echo "$p"; fi
  done
}

registry_copy() {
  local name="$1" version="$2" dir
  for dir in "$REGISTRY"/*/"$name-$version"; do
    [ -d "$dir" ] && { echo "$dir"; return 0; }
  done
  return 1
}

check() {
  local bad=0 hash name version tmp p want got
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  while read -r want name version; do
    [ -d "$VENDOR/$name" ] || { echo "MISSING vendor/$name"; bad=1; continue; }
    rm -rf "${tmp:?}/$name"
    cp -a "$VENDOR/$name" "$tmp/$name"
    # Reverse, newest first. `-E`: a file a patch creates (its hunk starts at `-0,0`) is
    # empty once reversed, and removed.
    for p in $(patches_of "$name" | sort -r); do
      if ! patch -s -R -E -p1 -d "$tmp/$name" --no-backup-if-mismatch -r - <"$p" >/dev/null; then
        echo "FAIL $name: $(basename "$p") does not reverse-apply to vendor/$name"
        bad=1
        continue 2
      fi
    done
    got="$(tree_hash "$tmp/$name")"
    if [ "$got" = "$want" ]; then
      echo "ok   $name $version = pristine + $(patches_of "$name" | wc -l) patch(es)"
    else
      echo "FAIL $name: vendor/$name minus its patches is not the pristine $name $version"
      if dir="$(registry_copy "$name" "$version")"; then
        diff -ru -x .cargo-ok "$dir" "$tmp/$name" | head -40 || true
      fi
      bad=1
    fi
  done <"$PRISTINE"
  # Every vendored crate and every patch is accounted for.
  for dir in "$VENDOR"/*/; do
    name="$(basename "$dir")"
    [ "$name" = patches ] && continue
    grep -q " $name " "$PRISTINE" || { echo "FAIL vendor/$name is not in pristine.sha256"; bad=1; }
  done
  for p in "$VENDOR"/patches/*.patch; do
    [ -e "$p" ] || continue
    name="$(sed -n 's/^Crate: //p' "$p" | head -1)"
    grep -q " $name " "$PRISTINE" || { echo "FAIL $(basename "$p") names no vendored crate ($name)"; bad=1; }
  done
  return "$bad"
}

refresh() {
  local name version dir p out
  out="$(mktemp)"
  while read -r _ name version; do
    dir="$(registry_copy "$name" "$version")" || die "$name $version not in $REGISTRY (cargo fetch, with [patch.crates-io] commented out)"
    rm -rf "${VENDOR:?}/$name"
    cp -a "$dir" "$VENDOR/$name"
    rm -f "$VENDOR/$name/.cargo-ok"
    echo "$(tree_hash "$VENDOR/$name") $name $version" >>"$out"
    for p in $(patches_of "$name"); do
      patch -s -p1 -d "$VENDOR/$name" --no-backup-if-mismatch -r - <"$p" ||
        die "$(basename "$p") does not apply to $name $version"
      echo "applied $(basename "$p")"
    done
  done <"$PRISTINE"
  mv "$out" "$PRISTINE"
}

case "${1:-check}" in
  check) check ;;
  refresh) refresh ;;
  diff)
    name="${2:?crate name}"
    version="$(awk -v n="$name" '$2 == n {print $3}' "$PRISTINE")"
    dir="$(registry_copy "$name" "$version")" || die "$name $version not in $REGISTRY"
    # a/ = pristine + the existing patches, b/ = vendor/CRATE; paths relative to the crate
    # directory (`patch -p1` inside it).
    tmp="$(mktemp -d)"
    cp -a "$dir" "$tmp/a" && rm -f "$tmp/a/.cargo-ok"
    for p in $(patches_of "$name"); do
      patch -s -p1 -d "$tmp/a" --no-backup-if-mismatch -r - <"$p" >/dev/null ||
        die "$(basename "$p") does not apply to $name $version"
    done
    cp -a "$VENDOR/$name" "$tmp/b"
    # A file the change adds or removes is named /dev/null on its missing side (diff -N dates
    # it 1970-01-01), so that `patch -R` in `check` deletes an added file instead of leaving
    # it empty.
    (cd "$tmp" && diff -ruN a b |
      sed -E -e 's/^(---|\+\+\+) [^\t]*\t1970-01-01 .*/\1 \/dev\/null/' \
        -e 's/^(---|\+\+\+) ([^\t]*)\t.*/\1 \2/') || true
    rm -rf "$tmp"
    ;;
  *) die "usage: vendor.sh [check|refresh|diff CRATE]" ;;
esac
