# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=bash
#
# Shared by kernel-patches/check and kernel-patches/boot-test: the cache
# directory, installing linux-source-6.12, extracting it once, applying the
# series.  Sourced, not run; expects `set -euo pipefail` and $here.

work=${KPATCH_WORK:-$here/work}
series_dir=$here
source_pkg=linux-source-6.12
tarball=/usr/src/linux-source-6.12.tar.xz

step() { printf '==> %s\n' "$*"; }
fail() {
	printf 'FAILED: %s\n' "$*" >&2
	exit 1
}

# The patches of the series, in order (the cover letter is not a patch).
series() {
	local p
	for p in "$series_dir"/[0-9][0-9][0-9][0-9]-*.patch; do
		case $p in */0000-*) continue ;; esac
		printf '%s\n' "$p"
	done
}

# Files the series changes, relative to the tree root, without duplicates.
series_files() {
	series | xargs sed -n 's|^+++ b/||p' | sort -u
}

# The tools these scripts run, checked up front (.ci/need.sh: `command -v`, or a file
# for headers and the source tarball) and installed when missing.
# shellcheck source=../.ci/need.sh
. "$series_dir/../.ci/need.sh"

# install_build_deps [WHAT:PACKAGE...]: what every script here needs, and the extras given.
# rsync is for headers_install.
install_build_deps() {
	need make:make gcc:gcc g++:g++ patch:patch git:git tar:tar xz:xz-utils bc:bc \
		bison:bison flex:flex rsync:rsync perl:perl sha256sum:coreutils dpkg-query:dpkg \
		/usr/include/libelf.h:libelf-dev /usr/include/openssl/ssl.h:libssl-dev \
		"$tarball:$source_pkg" "$@"
	step "build dependencies present"
}

# Extract the Debian source once per package version; print its path.
pristine_tree() {
	local version dir
	version=$(dpkg-query -W -f='${Version}' "$source_pkg")
	dir=$work/src/$source_pkg-$version
	if [ ! -f "$dir/.extracted" ]; then
		step "extracting $tarball ($version) into $dir" >&2
		rm -rf "$dir" "$dir.tmp"
		mkdir -p "$dir.tmp"
		tar -xJf "$tarball" -C "$dir.tmp" --strip-components=1
		mv "$dir.tmp" "$dir"
		touch "$dir/.extracted"
	fi
	printf '%s\n' "$dir"
}

# dry_run_series TREE: check that the whole series applies to TREE, in order,
# without changing anything.
dry_run_series() {
	local tree=$1
	local patches
	mapfile -t patches < <(series)
	[ "${#patches[@]}" -gt 0 ] || fail "no patches in $series_dir"
	step "dry run: git apply --check of ${#patches[@]} patches"
	# The ceiling keeps git from finding an enclosing repository (this one),
	# which would make it apply paths relative to that repository's root.
	(cd "$tree" && GIT_CEILING_DIRECTORIES=$(dirname "$tree") git apply --check "${patches[@]}") ||
		fail "the series does not apply"
}

# apply_series TREE: dry run of the whole series first, then apply it.
apply_series() {
	local tree=$1 p
	local patches
	dry_run_series "$tree"
	mapfile -t patches < <(series)
	for p in "${patches[@]}"; do
		printf '    %s\n' "$(basename "$p")"
		patch -d "$tree" -p1 -s --fuzz=0 --no-backup-if-mismatch <"$p" ||
			fail "$(basename "$p") does not apply"
	done
}

# prepare_tree TREE PRISTINE: make TREE a copy of PRISTINE with the series
# applied.  The copy is kept between runs and reused as long as neither the
# patches nor the pristine source changed (a stamp records their checksum), so
# that unchanged files keep their timestamps and the object cache stays valid;
# otherwise it is made afresh (hard links, cheap; patch(1) replaces the files it
# changes instead of writing through the links).
prepare_tree() {
	local tree=$1 pristine=$2 sum
	sum=$( (basename "$pristine"; series | xargs cat) | sha256sum | cut -d' ' -f1)
	if [ -f "$tree/.series-applied" ] && [ "$(cat "$tree/.series-applied")" = "$sum" ]; then
		step "reusing $tree (series unchanged; a dry run still checks it applies)"
		dry_run_series "$pristine"
		return
	fi
	step "applying the series to a fresh copy of $(basename "$pristine")"
	rm -rf "$tree"
	mkdir -p "$(dirname "$tree")"
	cp -al "$pristine" "$tree"
	apply_series "$tree"
	printf '%s\n' "$sum" >"$tree/.series-applied"
}
