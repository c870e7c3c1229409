# shellcheck shell=bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
#
# need WHAT:PACKAGE ...: make sure every external tool a script runs is there before it runs
# any of them, so a missing one is named up front instead of failing deep inside make
# (`headers_install: Error 127` was rsync). WHAT is a command (looked up with `command -v`) or
# an absolute path (a file that must exist, such as a static libc); PACKAGE is the Debian
# package that provides it. Everything missing is installed with one apt-get; what is still
# missing afterwards (or when NO_INSTALL=1) is named and the script exits 1.
#
# Sourced by .ci/run, kernel-patches/lib.sh and tests/e2e/run. Runs as root (CI does) or
# through sudo.

_need_present() {
	case $1 in
	/*) [ -e "$1" ] ;;
	*) command -v "$1" >/dev/null 2>&1 ;;
	esac
}

need() {
	local spec what pkgs=() still=()
	for spec in "$@"; do
		what=${spec%%:*}
		_need_present "$what" || pkgs+=("${spec#*:}")
	done
	[ ${#pkgs[@]} -gt 0 ] || return 0
	mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
	if [ "${NO_INSTALL:-0}" != 1 ]; then
		echo "need: installing ${pkgs[*]}" >&2
		local sudo=()
		[ "$(id -u)" -eq 0 ] || sudo=(sudo)
		"${sudo[@]}" apt-get update -qq >&2 || echo "need: apt-get update failed" >&2
		"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends "${pkgs[@]}" >&2 || echo "need: apt-get install failed" >&2
	fi
	for spec in "$@"; do
		_need_present "${spec%%:*}" || still+=("${spec%%:*} (package ${spec#*:})")
	done
	if [ ${#still[@]} -gt 0 ]; then
		printf 'need: missing: %s\n' "${still[@]}" >&2
		exit 1
	fi
}
