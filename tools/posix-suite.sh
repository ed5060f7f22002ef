#!/usr/bin/env bash
# POSIX conformance of a directory's filesystem: pjdfstest (tests/pjdfstest in this repository: upstream
# github.com/pjd/pjdfstest at 85a8aea, BSD licence, see its COPYING), the suite other FUSE and network
# filesystems run in their CI. On ext4: 9037 ok, 0 not ok (28 more are '# TODO', Linux's own deviations).
#
#   tools/posix-suite.sh DIR [GROUP...]  e.g. tools/posix-suite.sh /mnt/zipfs/posix       (everything)
#                                            posix-suite.sh /mnt/zipfs/posix chmod rename
#
# Runs as root (the suite changes owners and modes). Needs gcc, autoconf, automake (apt); builds once
# into ${PJD_BUILD:-${TMPDIR:-/tmp}/pjdfstest-build}. Each test file runs in its own fresh subdirectory
# of DIR. Prints one line per test file ("GROUP/NN.t ok=A notok=B"), then a summary line
# "pjdfstest: A ok, B not ok, F files, D dir-unusable" and exits 0 only when nothing failed.
# DIR-unusable counts test files that found DIR gone or no longer on the filesystem it started on (for a
# mount: it died); their checks are not counted as ok.
set -u
here=$(cd "$(dirname "$0")/../tests" && pwd)
dir=${1:?usage: posix-suite.sh DIR [GROUP...]}; shift
build=${PJD_BUILD:-${TMPDIR:-/tmp}/pjdfstest-build}
if [ ! -x "$build/pjdfstest" ]; then
  for p in gcc autoconf automake; do command -v $p >/dev/null || need="${need:-} $p"; done
  command -v prove >/dev/null || need="${need:-} perl"
  [ -z "${need:-}" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; }
  rm -rf "$build"; cp -r "$here/pjdfstest" "$build" && chmod -R u+w "$build"
  (cd "$build" && autoreconf -ifs && ./configure && make pjdfstest) >"$build.log" 2>&1 || { echo "pjdfstest build failed: see $build.log"; exit 2; }
fi
groups=("$@"); [ ${#groups[@]} -gt 0 ] || groups=($(cd "$build/tests" && ls -d */ | tr -d /))
ok=0; bad=0; files=0; dead=0; n=0
# the filesystem under test, by device number: a FUSE mount that died leaves the bare directory under it,
# and tests run there would measure the disk below instead
dev=$(stat -c %d "$dir") || exit 2
for g in "${groups[@]}"; do
  for t in $(ls "$build/tests/$g"/*.t 2>/dev/null); do
    n=$((n+1)); d="$dir/pjd.$$.$n"
    if [ "$(stat -c %d "$dir" 2>/dev/null)" != "$dev" ] || ! mkdir -p "$d" 2>/dev/null; then
      dead=$((dead+1)); echo "$g/$(basename $t) ok=0 notok=0 DIR-UNUSABLE"; continue
    fi
    out=$(cd "$d" && timeout 300 prove -v "$t" 2>&1)
    # "not ok ... # TODO" marks a known deviation of Linux itself (ext4 has 28): not a failure
    o=$(grep -c '^ok' <<<"$out"); b=$(grep '^not ok' <<<"$out" | grep -vc '# TODO')
    if [ "$(stat -c %d "$dir" 2>/dev/null)" != "$dev" ]; then  # it went away during this file
      dead=$((dead+1)); echo "$g/$(basename $t) ok=$o notok=$b DIR-WENT-AWAY"; bad=$((bad+b)); continue
    fi
    ok=$((ok+o)); bad=$((bad+b)); files=$((files+1))
    echo "$g/$(basename $t) ok=$o notok=$b"
    rm -rf "$d" 2>/dev/null
  done
done
echo "pjdfstest: $ok ok, $bad not ok, $files files, $dead dir-unusable"
[ $bad -eq 0 ] && [ $dead -eq 0 ]
