#!/bin/sh
# dom0 side of the e2e tests: runs the scenarios listed in /e2e/selected, one
# guest (or a few) each, and reports to the console:
#   E2E-RESULT PASS name | FAIL name: reason | SKIP name: reason
#   E2E-PERF backend workload value unit [round]
#   E2E-PERF-ORDER round backend...; E2E-PERF-QUEUES backend round text; E2E-COST; E2E-PROFILE
#   E2E-PROGRESS text        (shown on the host as it happens)
# The guest reports through its console log (lines starting E2E-DOMU).
# shellcheck disable=SC2153 # PERF_SECONDS & co. come from here
. /e2e/config
# Bounds on waits for guests are multiplied by this (E2E_TIME_SCALE on the host):
# under emulation on a loaded host a guest can take minutes to boot.
: "${TIME_SCALE:=3}"

LOGDIR=/var/log/xen/console
DISKS=/e2e/disks
BLKBACKD=/usr/local/sbin/blkbackd
BLKHOTPLUG=/usr/local/sbin/blkhotplug
BLKBACKD_LOG=/var/log/blkbackd.log
# util-linux's losetup (sector size, --show): busybox sh would prefer its own applet.
LOSETUP=/sbin/losetup
DEVID=51712 # xvda
SUP_PID=
ESC=$(printf '\033') # to strip colours from logs (busybox sed has no \x escapes)

selected() { grep -qx "$1" /e2e/selected; }

# Kernel logs: any of these in dom0's kernel log since the scenario began, or in the
# console of a guest it ran, fails the scenario (issue 21: a bad unmap shows as "BUG: Bad
# page map" and WARNINGs in dom0 and "backed has not unmapped grant" in the guest).
KLOG_BAD='BUG|WARNING|Oops|has not unmapped grant|general protection|Call Trace'
klog_mark() {
	KLOG_START=$(dmesg | wc -l)
	rm -f /e2e/guest-logs/* "$LOGDIR"/guest-*.log
}
mkdir -p /e2e/guest-logs
KLOG_START=$(dmesg | wc -l)

# E2E_KTRACE=1 on the host: kprobes on the kernel's side of a request's completion and of
# a grant unmap, per scenario (issue 21's root cause), summed up in one E2E-KTRACE line:
#   unmaps: gntdev unmaps (gnttab_unmap_refs_async: munmap of a grant mapping);
#   during_endio: those made while another CPU was inside blkdev_bio_end_io_async, which
#     posts the completion (ki_complete) and only then releases the bio's pages;
#   deferred: unmaps that found a page still referenced, so gntdev retried later
#     (gnttab_unmap_work, every 5 ms x age) while munmap had already cleared the PTE;
#   held_max_ms: the longest such page reference, first unmap to the last retry;
#   dirty_work: bio releases deferred to a workqueue (bio_dirty_fn).
TRACE=/sys/kernel/tracing
ktrace_start() {
	[ "${KTRACE:-0}" = 1 ] || return 0
	[ -d $TRACE/events ] || mount -t tracefs nodev $TRACE || return 0
	echo 0 >$TRACE/tracing_on
	echo >$TRACE/kprobe_events
	echo 16384 >$TRACE/buffer_size_kb
	{
		echo 'p:e2e/e2e_endio blkdev_bio_end_io_async'
		echo 'r:e2e/e2e_endio_ret blkdev_bio_end_io_async'
		echo 'p:e2e/e2e_unmap gnttab_unmap_refs_async item=%di:x64'
		echo 'p:e2e/e2e_retry gnttab_unmap_work item=%di:x64'
		echo 'p:e2e/e2e_dirty_work bio_dirty_fn'
	} >>$TRACE/kprobe_events || { progress "ktrace: kprobes refused"; return 0; }
	echo >$TRACE/trace
	echo 1 >$TRACE/events/e2e/enable
	echo 1 >$TRACE/tracing_on
}
ktrace_report() { # scenario
	[ "${KTRACE:-0}" = 1 ] && [ -d $TRACE/events/e2e ] || return 0
	echo 0 >$TRACE/tracing_on
	awk -v s="$1" '
	/ e2e_/ {
		cpu = $0; sub(/.*\[/, "", cpu); sub(/\].*/, "", cpu); cpu += 0
		t = $0; sub(/: e2e_.*/, "", t); n = split(t, f, " "); t = f[n] + 0
		ev = $0; sub(/.*: e2e_/, "", ev); sub(/:.*/, "", ev)
		item = $0; sub(/.*item=/, "", item); sub(/ .*/, "", item)
		if (ev == "endio") open[cpu] = 1
		else if (ev == "endio_ret") open[cpu] = 0
		else if (ev == "unmap") {
			unmaps++; first[item] = t
			for (c in open) if (c != cpu && open[c]) { during++; break }
		} else if (ev == "retry" && item in first) {
			if (!(item in held)) deferred++
			d = (t - first[item]) * 1000; held[item] = d; if (d > hmax) hmax = d
		} else if (ev == "dirty_work") dirty++
	}
	END { printf "E2E-KTRACE %s unmaps=%d during_endio=%d deferred=%d held_max_ms=%.1f dirty_work=%d\n", s, unmaps, during, deferred, hmax, dirty }
	' $TRACE/trace
	# Events lost to a full buffer would make the counts low.
	grep -q LOST $TRACE/trace && grep -m1 'entries-in-buffer' $TRACE/trace | sed 's/^/ktrace: /'
	echo 0 >$TRACE/events/e2e/enable
	echo >$TRACE/kprobe_events
}
klog_findings() {
	dmesg | tail -n +$((KLOG_START + 1)) | grep -E "$KLOG_BAD" | head -n 3 | sed 's/^/dom0: /'
	for g in /e2e/guest-logs/* "$LOGDIR"/guest-*.log; do
		[ -e "$g" ] || continue
		tr -d '\r' <"$g" | grep -v E2E-DOMU | grep -E "$KLOG_BAD" | head -n 3 | sed "s|^|${g##*/}: |"
	done
}
# Every tenth turn of a wait: stop waiting once a kernel log shows a finding (a guest
# whose blkfront disabled its disk would otherwise be waited for until the bound).
klog_poll() { # turn
	[ $(($1 % 10)) = 9 ] || return 0
	k=$(klog_findings | head -n 1)
	[ -z "$k" ] && return 0
	REASON="stopped waiting, kernel log: $k"
	return 1
}
# result PASS name ... | FAIL name: reason | SKIP name: reason; a PASS with kernel
# log findings is a FAIL, and a FAIL carries them.
result() { # one string: "PASS name ..." | "FAIL name: ..." | "SKIP name: ..."
	k=$(klog_findings | head -n 3 | tr '\n' ' ' | cut -c1-400)
	if [ -n "$k" ]; then
		klog_findings | sed 's/^/klog: /'
		case "$*" in
		PASS*)
			n=$*
			n=${n#PASS }
			echo "E2E-RESULT FAIL ${n%%[ :]*}: kernel log: $k"
			return
			;;
		FAIL*)
			echo "E2E-RESULT $* (kernel log: $k)"
			return
			;;
		esac
	fi
	echo "E2E-RESULT $*"
}
progress() { echo "E2E-PROGRESS $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.0f", b - a }'; }
# Timeouts are on the clock, not counted in loop turns: under emulation on a
# loaded host one `xl` call can take seconds.
deadline() { awk -v n="$(uptime_s)" -v t="$1" 'BEGIN { printf "%d", n + t }'; }
before() { awk -v n="$(uptime_s)" -v d="$1" 'BEGIN { exit !(n < d) }'; }

# A fully allocated image, so that a discard shows in its block count.
make_disk() { # path MiB
	rm -f "$1"
	dd if=/dev/zero of="$1" bs=1M count="$2" 2>/dev/null
}

# ------------------------------------------------------------------ guests
# write_cfg name tasks vcpus disk-spec...   (EXTRA_ARGS, ON_REBOOT from the environment)
write_cfg() {
	name=$1 tasks=$2 vcpus=$3
	shift 3
	disks=""
	for d in "$@"; do disks="$disks${disks:+, }'$d'"; done
	cat >"/e2e/$name.cfg" <<EOF
name="$name"
type="pv"
kernel="/e2e/vmlinuz"
ramdisk="/e2e/domU.cpio"
extra="console=hvc0 loglevel=5 e2e.tasks=$tasks e2e.seconds=$PERF_SECONDS ${EXTRA_ARGS:-}"
memory=${MEMORY:-256}
vcpus=$vcpus
on_poweroff="destroy"
on_reboot="${ON_REBOOT:-destroy}"
on_crash="destroy"
disk=[ $disks ]
EOF
}

guest_log() { echo "$LOGDIR/guest-$1.log"; }

# xl create; on failure REASON holds xl's last words.
# Under emulation on a loaded host QEMU's qdisk can miss libxl's fixed 10 s QMP
# timeout ("device model did not start"): that one failure is retried.
guest_create() { # name
	# An earlier guest's console is kept for the scenario's kernel log check.
	[ -e "$(guest_log "$1")" ] && mv "$(guest_log "$1")" "/e2e/guest-logs/$1.$(uptime_s).log"
	try=1
	while ! xl create "/e2e/$1.cfg" >"/e2e/$1.xl.log" 2>&1; do
		if [ $try -lt 3 ] && grep -q "device model did not start" "/e2e/$1.xl.log"; then
			progress "$1: device model start timed out under load, retrying ($try)"
			xl destroy "$1" >/dev/null 2>&1
			try=$((try + 1))
			continue
		fi
		REASON="xl create failed: $(grep -v '^Parsing' "/e2e/$1.xl.log" | tail -n 2 | tr '\n' ' ')"
		sed 's/^/xl: /' "/e2e/$1.xl.log"
		xl destroy "$1" >/dev/null 2>&1
		return 1
	done
	LAST_DOMID=$(domid_of "$1")
	progress "$1: created as domain $LAST_DOMID"
}

domid_of() { xl domid "$1" 2>/dev/null; }

wait_gone() { # name seconds
	end=$(deadline $(($2 * TIME_SCALE)))
	n=0
	while domid_of "$1" >/dev/null; do
		before "$end" || return 1
		klog_poll $n || return 1
		sleep 0.5
		n=$((n + 1))
	done
}

# The guest's report lines, without the marker and carriage returns.
guest_lines() { cat "$(guest_log "$1")" 2>/dev/null | tr -d '\r'; }
domu() { # name key -> last "E2E-DOMU key ..." line, rest of it
	guest_lines "$1" | sed -n "s/.*E2E-DOMU $2 *//p" | tail -n 1
}
domu_has() { guest_lines "$1" | grep -q "E2E-DOMU $2"; }

wait_domu() { # name key seconds
	end=$(deadline $(($3 * TIME_SCALE)))
	n=0
	until domu_has "$1" "$2"; do
		before "$end" || return 1
		klog_poll $n || return 1
		sleep 0.5
		n=$((n + 1))
	done
}

# Run a guest to its end (it powers itself off); REASON set on failure.
run_guest() { # name timeout
	guest_create "$1" || return 1
	REASON=""
	if ! wait_gone "$1" "$2"; then
		[ -n "$REASON" ] || REASON="guest still running after $2 s (last: $(guest_lines "$1" | grep E2E-DOMU | tail -n 1))"
		dump_guest "$1"
		xl destroy "$1" >/dev/null 2>&1
		return 1
	fi
}

dump_guest() { guest_lines "$1" | tail -n 40 | sed "s/^/guest $1: /"; }

# The 16 MiB data check: guest wrote and read back the same bytes, and the
# backing file in dom0 holds them too.
check_data() { # name dev backing
	line=$(domu "$1" "data $2")
	w=$(echo "$line" | sed -n 's/.*written=\([0-9a-f]*\).*/\1/p')
	r=$(echo "$line" | sed -n 's/.*read=\([0-9a-f]*\).*/\1/p')
	if [ -z "$w" ]; then
		REASON="guest reported no data result for $2 (${line:-no line})"
		dump_guest "$1"
		return 1
	fi
	[ "$w" = "$r" ] || { REASON="guest read back $r, wrote $w"; return 1; }
	d=$(dd if="$3" bs=1M count=16 2>/dev/null | md5sum | cut -d' ' -f1)
	[ "$d" = "$w" ] || { REASON="dom0 sees $d in $3, guest wrote $w"; return 1; }
}

# Perf lines from the guest, re-emitted under a backend name with the round's number
# (E2E-PERF backend workload value unit round); REASON on error.
PERF_FIGURES="seq-read-1M-qd1 seq-write-1M-qd1 rand-read-4k-qd1 rand-read-4k-qd32"
collect_perf() { # name backend round [figures]
	n=0 want=0
	for wl in ${4:-$PERF_FIGURES}; do
		want=$((want + 1))
		v=$(domu "$1" "perf $wl")
		if [ -n "$v" ]; then
			echo "E2E-PERF $2 $wl $v $3"
			n=$((n + 1))
		fi
	done
	if [ $n -ne $want ]; then
		PERF_FAIL="$PERF_FAIL $2 (round $3): $(domu "$1" "perf-error") ($n/$want figures);"
		return 1
	fi
	case " $PERF_DONE " in *" $2 "*) ;; *) PERF_DONE="$PERF_DONE $2" ;; esac
}

# ------------------------------------------------------------------ leaks
loops_for() { # backing file -> loop devices still bound to it
	for b in /sys/block/loop*/loop/backing_file; do
		[ -e "$b" ] || continue
		[ "$(cat "$b")" = "$1" ] && basename "$(dirname "$(dirname "$b")")"
	done
}
serve_pids() { # domid -> blkbackd serve processes for it (zombies included)
	ps -o pid,args 2>/dev/null | grep "blkbackd serve" | grep "/vbd/$1/" | grep -v grep | awk '{ print $1 }'
}
other_domains() { xl list 2>/dev/null | awk 'NR > 1 && $1 != "Domain-0"'; }

# Everything of a destroyed guest is gone from dom0 (waits up to 15 s).
check_no_leaks() { # domid backing-file...
	d=$1
	shift
	end=$(deadline 15)
	while :; do
		LEAK=""
		for f in "$@"; do
			l=$(loops_for "$f")
			[ -z "$l" ] || LEAK="$LEAK loop device $l still bound to $f;"
		done
		p=$(serve_pids "$d")
		[ -z "$p" ] || LEAK="$LEAK blkbackd serve still running for domain $d (pid $p);"
		o=$(other_domains)
		[ -z "$o" ] || LEAK="$LEAK domain left behind (dying: grants still mapped?): $o;"
		xenstore-exists "/local/domain/0/backend/vbd/$d" 2>/dev/null &&
			LEAK="$LEAK /local/domain/0/backend/vbd/$d still in XenStore;"
		[ -z "$LEAK" ] && return 0
		before "$end" || { REASON="leak:$LEAK"; return 1; }
		sleep 0.5
	done
}

# ------------------------------------------------------------------ blkbackd
have_project() { # scenario -> 0 when blkbackd and blkhotplug are in dom0, else SKIP
	if [ ! -x "$BLKBACKD" ]; then
		result "SKIP $1: blkbackd not built"
		return 1
	fi
	if [ ! -x "$BLKHOTPLUG" ]; then
		result "SKIP $1: blkhotplug not built"
		return 1
	fi
}

# One supervisor for the whole boot, as a toolstack host would run it: it
# watches backend/vbd and starts one `blkbackd serve` per device.
# SUP_ARGS: its options (BLKBACKD_ARGS, from E2E_BLKBACKD_ARGS on the host).
SUP_ARGS=${BLKBACKD_ARGS:-}
start_supervisor() {
	if [ -n "$SUP_PID" ] && kill -0 "$SUP_PID" 2>/dev/null; then return 0; fi
	# BLKBACKD_ENV (from E2E_BLKBACKD_ENV on the host, e.g. BLKBACKD_NO_SANDBOX=true) reaches every serve.
	# blkbackd::activity: each queue's counters per burst of requests (see perf_costs).
	env NO_COLOR=1 RUST_LOG=${LOG_LEVEL:-info},blkbackd::activity=debug ${BLKBACKD_ENV:-} \
		"$BLKBACKD" supervise --platform xen -v $SUP_ARGS >>"$BLKBACKD_LOG" 2>&1 &
	SUP_PID=$!
	sleep 1
	if ! kill -0 "$SUP_PID" 2>/dev/null; then
		REASON="blkbackd supervise exited: $(tail -n 2 "$BLKBACKD_LOG" | tr '\n' ' ')"
		SUP_PID=
		return 1
	fi
}

stop_supervisor() {
	if [ -n "$SUP_PID" ]; then
		kill "$SUP_PID" 2>/dev/null
		wait "$SUP_PID" 2>/dev/null
		SUP_PID=
	fi
}

# What each burst of a guest's requests cost blkbackd (its blkbackd::activity
# log lines for that domain), re-emitted as E2E-COST backend fields...
perf_costs() { # domid backend
	sed "s/$ESC\\[[0-9;]*m//g" "$BLKBACKD_LOG" | grep "blkbackd::activity" | grep "vbd-$1-" |
		sed -n 's/.*burst://p' | while read -r l; do echo "E2E-COST $2 $l"; done
}

dump_blkbackd() {
	tail -n 40 "$BLKBACKD_LOG" 2>/dev/null | sed "s/$ESC\\[[0-9;]*m//g; s/^/blkbackd: /"
	# A seccomp kill is logged by the kernel (audit type=1326, with the syscall number).
	dmesg | grep -i -e seccomp -e 'type=1326' | tail -n 5 | sed 's/^/dom0 kernel: /'
}

# libxl 4.17 gives hotplug scripts a XENBUS_PATH relative to dom0's home
# ("backend/vbd/D/N", as xenstore-read resolves it). E2E_XENBUS_PATH_ABSOLUTE=1
# on the host puts a wrapper in between that makes it absolute, for a
# blkhotplug that accepts only absolute paths.
HOTPLUG_SCRIPT=$BLKHOTPLUG
if [ "${XENBUS_PATH_ABSOLUTE:-0}" = 1 ]; then
	HOTPLUG_SCRIPT=/e2e/blkhotplug-absolute
	{
		echo '#!/bin/sh'
		echo 'case "$XENBUS_PATH" in /*) ;; *) XENBUS_PATH=/local/domain/0/$XENBUS_PATH ;; esac'
		echo 'export XENBUS_PATH'
		echo "exec $BLKHOTPLUG \"\$@\""
	} >$HOTPLUG_SCRIPT
	chmod 755 $HOTPLUG_SCRIPT
fi

hotplug_disk() { # vdev target
	echo "format=raw, vdev=$1, access=rw, backendtype=phy, script=$HOTPLUG_SCRIPT, target=$2"
}

fail_bb() { # scenario
	e=$(sed "s/$ESC\\[[0-9;]*m//g" "$BLKBACKD_LOG" 2>/dev/null | grep -e ERROR -e WARN | grep -v Landlock | tail -n 1 | cut -c1-200)
	[ -z "$e" ] || REASON="$REASON (blkbackd log: ${e#*Z })"
	result "FAIL $1: $REASON"
	dump_blkbackd
}

# How the backend of domain $1 got its device: "fd handoff" when it named a
# handoff socket (blkhotplug sent the fd it created), "opened" when it opened
# physical-device itself and wrote opened = 1 (the series' form).
device_path() { # domid
	if xenstore-read /local/domain/0/backend/vbd/$1/$DEVID/handoff-socket >/dev/null 2>&1; then
		echo "fd handoff"
	elif [ "$(xenstore-read /local/domain/0/backend/vbd/$1/$DEVID/opened 2>/dev/null)" = 1 ]; then
		echo "opened"
	else
		echo "unknown"
	fi
}

# Whether a process holds an fd on block device $2 (sysfs name, e.g. loop3).
holds_device() { # pid dev
	want=$(cat /sys/block/$2/dev)
	for f in /proc/$1/fd/*; do
		[ -b "$f" ] || continue
		[ "$(printf '%d:%d' "0x$(stat -L -c %t "$f")" "0x$(stat -L -c %T "$f")")" = "$want" ] && return 0
	done
	return 1
}

# (1) A file through blkhotplug's autoclear loop device, served by blkbackd;
# blkbackd-handoff: the same with the supervisor's --handoff-dir, so that
# blkhotplug hands the fd it created to the serve process over a socket.
file_scenario() { # scenario want-path
	s=$1
	have_project $s || return
	start_supervisor || { fail_bb $s; return; }
	img=$DISKS/file.img
	make_disk $img 128
	write_cfg e2e-file data 1 "$(hotplug_disk xvda $img)"
	guest_create e2e-file || { fail_bb $s; return; }
	d=$(domid_of e2e-file)
	wait_domu e2e-file boot 60
	l=$(loops_for $img)
	ac=""
	[ -n "$l" ] && ac=$(cat /sys/block/$l/loop/autoclear)
	p=$(serve_pids "$d")
	path=$(device_path "$d")
	held=no
	[ -n "$l" ] && [ -n "$p" ] && holds_device "${p%% *}" "$l" && held=yes
	if ! wait_gone e2e-file 400; then
		REASON="guest did not finish"
		dump_guest e2e-file
		xl destroy e2e-file
		fail_bb $s
		return
	fi
	if [ -z "$l" ]; then
		REASON="no loop device bound to $img while the guest ran"
	elif [ "$ac" != 1 ]; then
		REASON="loop device $l has autoclear=$ac"
	elif [ -z "$p" ]; then
		REASON="no blkbackd serve process for domain $d while the guest ran"
	elif [ "$path" != "$2" ]; then
		REASON="the backend got its device by $path, not $2"
	elif [ $held != yes ]; then
		REASON="serve process $p held no fd on $l"
	elif check_data e2e-file xvda $img && check_no_leaks "$d" $img; then
		result "PASS $s (device: $path)"
		rm -f $img
		return
	fi
	fail_bb $s
	rm -f $img
}
sc_blkbackd_file() { file_scenario blkbackd-file opened; }
sc_blkbackd_handoff() {
	old_args=$SUP_ARGS
	stop_supervisor
	SUP_ARGS="$SUP_ARGS --handoff-dir /run/blkbackd-handoff"
	file_scenario blkbackd-handoff "fd handoff"
	stop_supervisor
	SUP_ARGS=$old_args
}

# (2) Everything blkfront negotiates: multi-page ring, 2 queues, indirect
# descriptors, persistent grants, flush, discard, and a 4096-byte-sector disk.
sc_blkbackd_features() {
	s=blkbackd-features
	have_project $s || return
	start_supervisor || { fail_bb $s; return; }
	img=$DISKS/feat.img img4k=$DISKS/feat4k.img
	make_disk $img 128
	make_disk $img4k 64
	l4k=$($LOSETUP --show -f -b 4096 $img4k) || { result "FAIL $s: cannot make a 4096-byte-sector loop device"; return; }
	before=$(du -k $img | cut -f1)
	# 2 queues x 16-page rings x 2 disks: blkfront preallocates more than 256 MiB allows (OOM panic seen).
	MEMORY=768 EXTRA_ARGS="e2e.ringorder=4" write_cfg e2e-feat data,features,data-xvdb 2 \
		"$(hotplug_disk xvda $img)" "$(hotplug_disk xvdb $l4k)"
	guest_create e2e-feat || { fail_bb $s; $LOSETUP -d $l4k; return; }
	d=$(domid_of e2e-feat)
	wait_domu e2e-feat boot 60
	fe=/local/domain/$d/device/vbd/$DEVID be=/local/domain/0/backend/vbd/$d/$DEVID
	wait_domu e2e-feat "data xvda" 120 || progress "e2e-feat: no data report yet"
	order=$(xenstore-read $fe/ring-page-order 2>/dev/null)
	[ -n "$order" ] || order=$(xenstore-read $fe/queue-0/ring-page-order 2>/dev/null)
	nq=$(xenstore-read $fe/multi-queue-num-queues 2>/dev/null)
	fpers=$(xenstore-read $fe/feature-persistent 2>/dev/null)
	bpers=$(xenstore-read $be/feature-persistent 2>/dev/null)
	indirect=$(xenstore-read $be/feature-max-indirect-segments 2>/dev/null)
	flush=$(xenstore-read $be/feature-flush-cache 2>/dev/null)
	discard=$(xenstore-read $be/feature-discard 2>/dev/null)
	if ! wait_gone e2e-feat 180; then
		REASON="guest did not finish"
		dump_guest e2e-feat
		xl destroy e2e-feat
		fail_bb $s
		$LOSETUP -d $l4k
		return
	fi
	after=$(du -k $img | cut -f1)
	domu_has e2e-feat "feature queues" || dump_guest e2e-feat
	bf=$(domu e2e-feat "feature blkfront")
	REASON=""
	[ "$order" = 4 ] || REASON="$REASON ring-page-order=$order (want 4);"
	[ "$nq" = 2 ] || REASON="$REASON multi-queue-num-queues=$nq (want 2);"
	[ "$(domu e2e-feat "feature queues")" = 2 ] || REASON="$REASON guest has $(domu e2e-feat "feature queues") queues;"
	[ "$fpers" = 1 ] && [ "$bpers" = 1 ] || REASON="$REASON feature-persistent front=$fpers back=$bpers;"
	echo "$bf" | grep -q "persistent grants: enabled" || REASON="$REASON blkfront: $bf;"
	[ -n "$indirect" ] && [ "$indirect" -ge 32 ] 2>/dev/null || REASON="$REASON feature-max-indirect-segments=$indirect;"
	echo "$bf" | grep -q "indirect descriptors: enabled" || REASON="$REASON no indirect descriptors in blkfront;"
	[ "$flush" = 1 ] || REASON="$REASON feature-flush-cache=$flush;"
	echo "$bf" | grep -q "flush diskcache: enabled" || REASON="$REASON no flush in blkfront;"
	[ "$discard" = 1 ] || REASON="$REASON feature-discard=$discard;"
	[ "$(domu e2e-feat "feature discard")" = ok ] || REASON="$REASON guest discard: $(domu e2e-feat "feature discard");"
	[ $((before - after)) -ge 61440 ] || REASON="$REASON backing file only shrank from ${before} to ${after} KiB after discarding 64 MiB;"
	[ "$(domu e2e-feat "feature xvdb_logical_block_size")" = 4096 ] ||
		REASON="$REASON xvdb logical block size $(domu e2e-feat "feature xvdb_logical_block_size") (want 4096);"
	if [ -z "$REASON" ]; then
		if check_data e2e-feat xvda $img && check_data e2e-feat xvdb $img4k; then
			$LOSETUP -d $l4k
			if check_no_leaks "$d" $img; then
				result "PASS $s"
				rm -f $img $img4k
				return
			fi
		fi
	fi
	$LOSETUP -d $l4k 2>/dev/null
	fail_bb $s
	rm -f $img $img4k
}

# (3) xl reboot and reconnect; block-attach/detach while running; destroy with I/O in flight.
sc_blkbackd_lifecycle() {
	s=blkbackd-lifecycle
	have_project $s || return
	start_supervisor || { fail_bb $s; return; }
	img=$DISKS/life.img img2=$DISKS/life2.img
	make_disk $img 128
	make_disk $img2 64

	# a. reboot: the guest writes, dom0 reboots it, the second boot reads the same bytes.
	ON_REBOOT=restart write_cfg e2e-life reboot 1 "$(hotplug_disk xvda $img)"
	guest_create e2e-life || { fail_bb $s; return; }
	d=$(domid_of e2e-life)
	if ! wait_domu e2e-life "first-boot" 90; then
		REASON="reboot: first boot did not finish its writes"
		dump_guest e2e-life
		xl destroy e2e-life
		fail_bb $s
		return
	fi
	xl reboot e2e-life
	wait_domu e2e-life "second-boot" 120 && d=$(domid_of e2e-life)
	if ! domu_has e2e-life "second-boot" || ! wait_gone e2e-life 60; then
		REASON="reboot: no second boot report"
		dump_guest e2e-life
		xl destroy e2e-life
		fail_bb $s
		return
	fi
	sb=$(domu e2e-life second-boot)
	exp=$(echo "$sb" | sed -n 's/.*expected=\([0-9a-f]*\).*/\1/p')
	got=$(echo "$sb" | sed -n 's/.*read=\([0-9a-f]*\).*/\1/p')
	if [ -z "$exp" ] || [ "$exp" != "$got" ]; then
		REASON="reboot: after reconnect the guest read $got, expected $exp"
		fail_bb $s
		return
	fi
	check_data e2e-life xvda $img || { REASON="reboot: $REASON"; fail_bb $s; return; }
	check_no_leaks "$d" $img || { REASON="reboot: $REASON"; fail_bb $s; return; }

	# b. block-attach and block-detach of a second disk while the guest runs.
	write_cfg e2e-life attach 1 "$(hotplug_disk xvda $img)"
	guest_create e2e-life || { fail_bb $s; return; }
	d=$(domid_of e2e-life)
	wait_domu e2e-life boot 60
	if ! xl block-attach e2e-life "$(hotplug_disk xvdb $img2)" >/e2e/attach.log 2>&1; then
		REASON="block-attach failed: $(tail -n 2 /e2e/attach.log | tr '\n' ' ')"
		xl destroy e2e-life
		fail_bb $s
		return
	fi
	if ! wait_domu e2e-life xvdb-done 90; then
		REASON="attach: the guest never used xvdb ($(domu e2e-life xvdb))"
		dump_guest e2e-life
		xl destroy e2e-life
		fail_bb $s
		return
	fi
	xl block-detach e2e-life xvdb >/e2e/detach.log 2>&1 || {
		REASON="block-detach failed: $(tail -n 2 /e2e/detach.log | tr '\n' ' ')"
		xl destroy e2e-life
		fail_bb $s
		return
	}
	wait_domu e2e-life "xvdb-gone" 60 || REASON="detach: the guest still has xvdb"
	sleep 2
	l=$(loops_for $img2)
	wait_gone e2e-life 60 || xl destroy e2e-life
	if ! domu_has e2e-life xvdb-gone; then fail_bb $s; return; fi
	[ -z "$l" ] || { REASON="detach: loop device $l still bound to $img2 after block-detach"; fail_bb $s; return; }
	check_data e2e-life xvdb $img2 || { REASON="attach: $REASON"; fail_bb $s; return; }
	check_no_leaks "$d" $img $img2 || { REASON="attach: $REASON"; fail_bb $s; return; }

	# c. xl destroy with I/O in flight.
	write_cfg e2e-life hammer 1 "$(hotplug_disk xvda $img)"
	guest_create e2e-life || { fail_bb $s; return; }
	d=$(domid_of e2e-life)
	if ! wait_domu e2e-life hammer-start 60; then
		REASON="destroy: guest never started its I/O"
		dump_guest e2e-life
		xl destroy e2e-life
		fail_bb $s
		return
	fi
	sleep 3
	xl destroy e2e-life
	check_no_leaks "$d" $img || { REASON="destroy: $REASON"; fail_bb $s; return; }
	result "PASS $s"
	rm -f $img $img2
}

# (4) issue 15: a serve process killed (SIGKILL) 5 times, 2 s apart, with an upgrade (the binary
# replaced, SIGHUP to the supervisor) between each two kills, while the guest writes files on
# ext4 and verifies random blocks (domU/init restart_task): each time the supervisor starts one
# that takes over from the in-flight log
# (no handshake, nothing in XenStore changes); the guest sees no I/O error, every block it
# wrote reads back, and once it is gone nothing is left behind.
sc_blkbackd_restart() {
	s=blkbackd-restart
	have_project $s || return
	start_supervisor || { fail_bb $s; return; }
	log0=$(wc -l <"$BLKBACKD_LOG")
	img=$DISKS/restart.img
	make_disk $img 64
	write_cfg e2e-restart restart 2 "$(hotplug_disk xvda $img)"
	guest_create e2e-restart || { fail_bb $s; return; }
	d=$(domid_of e2e-restart)
	REASON=""
	if ! wait_domu e2e-restart restart-start 60; then
		REASON="guest never started its I/O"
	fi
	kills=0
	upgrades=0
	while [ -z "$REASON" ] && [ $kills -lt 5 ]; do
		sleep 2
		p=$(serve_pids "$d")
		[ -n "$p" ] || { REASON="no blkbackd serve process for domain $d after $kills kills and $upgrades upgrades;"; break; }
		domu_has e2e-restart "restart [of]" && break
		# Between two kills, an upgrade: a copy of the binary renamed over it (as a
		# package manager installs one), then SIGHUP to the supervisor.
		if [ $kills -gt $upgrades ]; then
			cp "$BLKBACKD" "$BLKBACKD.new" && mv "$BLKBACKD.new" "$BLKBACKD" && kill -HUP "$SUP_PID"
			upgrades=$((upgrades + 1))
			what="upgrade $upgrades"
		else
			kill -9 $p
			kills=$((kills + 1))
			what="kill $kills"
		fi
		end=$(deadline 20)
		until q=$(serve_pids "$d") && [ -n "$q" ] && [ "$q" != "$p" ]; do
			before "$end" || { REASON="serve $p: $what, not replaced;"; break; }
			sleep 0.2
		done
		progress "blkbackd-restart: $what (guest at round $(domu e2e-restart 'restart round' | cut -d' ' -f1)): serve $p replaced by $q"
	done
	if ! wait_gone e2e-restart 400; then
		REASON="$REASON guest did not finish ($(domu e2e-restart restart));"
		dump_guest e2e-restart
		xl destroy e2e-restart
	else
		rec=$(domu e2e-restart restart)
		case "$rec" in ok*) ;; *) REASON="$REASON guest: restart $rec;" ;; esac
	fi
	[ $kills -ge 3 ] || REASON="$REASON only $kills kills before the guest finished;"
	kill -0 "$SUP_PID" 2>/dev/null || REASON="$REASON the supervisor died;"
	took=$(tail -n +$((log0 + 1)) "$BLKBACKD_LOG" | grep -c "starting a backend that takes over")
	handed=$(tail -n +$((log0 + 1)) "$BLKBACKD_LOG" | grep -c "handed the disk over; starting the upgraded one")
	[ "$handed" -ge "$upgrades" ] || REASON="$REASON $upgrades upgrades but $handed hand-overs in the supervisor's log;"
	tail -n +$((log0 + 1)) "$BLKBACKD_LOG" | grep -q "falling back" && REASON="$REASON an upgrade fell back;"
	problems=$REASON
	check_no_leaks "$d" $img || problems="$problems $REASON"
	REASON=$problems
	if [ -z "$REASON" ]; then
		result "PASS $s ($kills kills, $took take-overs, $upgrades upgrades, $handed hand-overs in the supervisor's log, guest: $rec, last round: $(domu e2e-restart 'restart round 8'))"
	else
		dump_guest e2e-restart
		fail_bb $s
	fi
	rm -f $img
}

# (5) blkhotplug's device-mapper path: `target=linear:/dev/BLOCKDEV` makes it
# create a private dm linear device over BLOCKDEV (Debian's 6.1 has no
# DM_FILE_DESCRIPTOR_FLAG, so this is its fallback: create, open, verify,
# deferred remove); the dm device must be gone once the guest is.
sc_blkhotplug_dm() {
	s=blkhotplug-dm
	have_project $s || return
	modprobe dm-mod || { result "FAIL $s: cannot load dm-mod"; return; }
	start_supervisor || { fail_bb $s; return; }
	img=$DISKS/dm.img
	make_disk $img 128
	l=$($LOSETUP --show -f $img) || { result "FAIL $s: losetup failed"; return; }
	ndm_before=$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)
	write_cfg e2e-dm data 1 "$(hotplug_disk xvda "linear:$l")"
	guest_create e2e-dm || { fail_bb $s; $LOSETUP -d "$l"; return; }
	d=$(domid_of e2e-dm)
	wait_domu e2e-dm boot 60
	ndm_during=$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)
	if ! wait_gone e2e-dm 120; then
		REASON="guest did not finish"
		dump_guest e2e-dm
		xl destroy e2e-dm
		fail_bb $s
		$LOSETUP -d "$l"
		return
	fi
	REASON=""
	[ "$ndm_during" -gt "$ndm_before" ] || REASON="no device-mapper device while the guest ran;"
	if [ -z "$REASON" ] && check_data e2e-dm xvda $img && check_no_leaks "$d"; then
		end=$(deadline 10)
		while [ "$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)" -ne "$ndm_before" ] && before "$end"; do
			sleep 0.5
		done
		if [ "$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)" -eq "$ndm_before" ]; then
			result "PASS $s"
			$LOSETUP -d "$l"
			rm -f $img
			return
		fi
		REASON="device-mapper device left after the guest: $(cat /sys/block/dm-*/dm/name 2>/dev/null | tr '\n' ' ')"
	fi
	fail_bb $s
	$LOSETUP -d "$l"
	rm -f $img
}

# A hotplug script that lies: the right major:minor with a diskseq that is not the device's.
bad_diskseq_script() {
	cat >/e2e/bad-diskseq-script <<'EOF'
#!/bin/sh
[ "$1" = add ] || exit 0
dev=$(xenstore-read "$XENBUS_PATH/params")
seq=$(cat /sys/block/$(basename "$dev")/diskseq)
xenstore-write "$XENBUS_PATH/physical-device" "$(printf '%x@%s' $((seq + 4096)) "$(stat -L -c '%t:%T' "$dev")")" \
	"$XENBUS_PATH/hotplug-status" connected
EOF
	chmod 755 /e2e/bad-diskseq-script
}

# The error a backend of domain $1 wrote where xenbus_dev_fatal writes it, waited for up to
# 20 s; empty if none came.
wait_error_node() { # domid
	end=$(deadline 20)
	while before "$end"; do
		xenstore-read /local/domain/0/error/backend/vbd/$1/$DEVID/error 2>/dev/null && return
		sleep 0.5
	done
}

# (6) A physical-device whose diskseq does not match is refused, visibly in XenStore.
sc_diskseq_mismatch() {
	s=diskseq-mismatch
	have_project $s || return
	start_supervisor || { fail_bb $s; return; }
	img=$DISKS/seq.img
	make_disk $img 64
	l=$($LOSETUP --show -f $img)
	bad_diskseq_script
	write_cfg e2e-seq probe 1 "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/e2e/bad-diskseq-script, target=$l"
	if ! guest_create e2e-seq; then
		# xl may give up on a device its backend refused; the XenStore error is what counts.
		progress "diskseq-mismatch: $REASON"
	fi
	d=$(domid_of e2e-seq)
	wait_domu e2e-seq probe 60
	err=$(wait_error_node "$d")
	state=$(xenstore-read /local/domain/0/backend/vbd/$d/$DEVID/state 2>/dev/null)
	probe=$(domu e2e-seq probe)
	xl destroy e2e-seq 2>/dev/null
	$LOSETUP -d $l
	REASON=""
	echo "$err" | grep -qi diskseq || REASON="no diskseq error in XenStore (error node: '${err}', state $state);"
	case "$probe" in *read-ok*) REASON="$REASON the guest could read the refused disk;" ;; esac
	if [ -z "$REASON" ] && check_no_leaks "$d" $img; then
		result "PASS $s"
	else
		fail_bb $s
	fi
	rm -f $img
}

# A file out of dom0, through the console: E2E-FILE name lines (gzip, base64), then
# E2E-FILE-END name with the md5 of the file; tests/e2e/run writes it to work/files/name.
export_file() { # name path
	gzip -c "$2" | base64 | sed "s/^/E2E-FILE $1 /"
	echo "E2E-FILE-END $1 $(md5sum <"$2" | cut -d' ' -f1)"
}

# A real Linux blkfront recorded for the replay corpus: blkbackd supervise --record DIR (here
# through BLKBACKD_RECORD) has each serve process record a ring trace. The guest (2 vCPUs,
# 2 queues) makes an ext4 file system, checks it, runs a random mix of writes and reads,
# discards, and reboots itself; its next boot (a new domain, a new serve process, a second
# trace) checks the file system and reads the first boot's blocks back. The traces come out
# as work/files/$REC-boot1.trace and $REC-boot2.trace, the second marked as starting from
# the disk the first left (`"initial":"after"`), so that its reads are compared too
# (tests/traces/real-linux-*.trace are such recordings).
REC=real-linux-2q
sc_blkbackd_record() {
	s=blkbackd-record
	have_project $s || return
	traces=/var/log/traces
	rm -rf $traces
	old_env=${BLKBACKD_ENV:-}
	stop_supervisor
	BLKBACKD_ENV="$old_env BLKBACKD_RECORD=$traces BLKBACKD_RECORD_INITIAL=zero"
	start_supervisor || { BLKBACKD_ENV=$old_env; fail_bb $s; return; }
	BLKBACKD_ENV=$old_env
	img=$DISKS/record.img
	make_disk $img 16
	# Two vCPUs: blkfront asks for two queues.
	ON_REBOOT=restart write_cfg e2e-record record 2 "$(hotplug_disk xvda $img)"
	REASON=""
	guest_create e2e-record || { fail_bb $s; return; }
	d1=$(domid_of e2e-record)
	# Only the second boot says "record ok"; either says "record failed".
	if wait_domu e2e-record "record [of]" 600 && wait_gone e2e-record 60; then
		rec=$(domu e2e-record record)
		[ "$rec" = ok ] || REASON="guest: record $rec"
	else
		REASON="guest did not finish ($(domu e2e-record record))"
		dump_guest e2e-record
		xl destroy e2e-record
	fi
	# Each serve process writes the end of its trace as it exits.
	end=$(deadline 20)
	while [ -n "$(pgrep -f 'blkbackd serve')" ] && before "$end"; do sleep 0.2; done
	stop_supervisor
	first=$traces/vbd-$d1-$DEVID.trace
	# shellcheck disable=SC2012 # names made here
	second=$(ls $traces/vbd-*-$DEVID.trace 2>/dev/null | grep -v "/vbd-$d1-")
	if [ -z "$REASON" ]; then
		for t in $first $second; do
			grep -q '"t":"exit"' "$t" 2>/dev/null || REASON="$REASON no whole trace in $t;"
		done
		[ "$(echo "$second" | wc -w)" = 1 ] || REASON="$REASON not one second-boot trace: $second;"
	fi
	if [ -n "$REASON" ]; then
		fail_bb $s
	else
		sed -i "s/\"initial\":\"zero\"/\"initial\":\"after\",\"after\":\"$REC-boot1.trace\"/" "$second"
		export_file $REC-boot1.trace $first
		export_file $REC-boot2.trace $second
		result "PASS $s (traces of $(grep -c '"t":"rsp"' $first) and $(grep -c '"t":"rsp"' $second) responses, $(cat $first $second | wc -c) bytes)"
	fi
	rm -rf $img $traces
}

# ------------------------------------------------------------------ NBD (issue 16)
# A guest's disk on the network: qemu-storage-daemon in dom0 serves a qcow2 image over a
# Unix socket, xl's target is nbd+unix:///disk0?socket=PATH through blkhotplug, which
# connects and hands the socket to the serve process (supervise --handoff-dir); the guest's
# data check passes and dom0 reads the image back through qemu-img (after `qemu-img check`).
sc_blkbackd_nbd() {
	s=blkbackd-nbd
	have_project $s || return
	command -v qemu-storage-daemon >/dev/null || { result "FAIL $s: no qemu-storage-daemon in dom0"; return; }
	img=$DISKS/nbd.qcow2 raw=$DISKS/nbd.raw sock=/run/qsd-e2e.sock
	rm -f $img $raw $sock
	qemu-img create -q -f qcow2 $img 64M >/tmp/qsd.log 2>&1 || { result "FAIL $s: qemu-img create: $(cat /tmp/qsd.log)"; return; }
	qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=$img \
		--blockdev driver=qcow2,node-name=disk0,file=file0 \
		--nbd-server addr.type=unix,addr.path=$sock \
		--export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on >/tmp/qsd.log 2>&1 &
	qsd=$!
	end=$(deadline 20)
	while [ ! -S $sock ] && kill -0 $qsd 2>/dev/null && before "$end"; do sleep 0.2; done
	[ -S $sock ] || { result "FAIL $s: qemu-storage-daemon did not listen: $(tail -n 3 /tmp/qsd.log | tr '\n' ' ')"; kill $qsd 2>/dev/null; return; }
	old_args=$SUP_ARGS
	stop_supervisor
	SUP_ARGS="$SUP_ARGS --handoff-dir /run/blkbackd-handoff"
	REASON=""
	if start_supervisor; then
		# Two vCPUs: blkfront asks for two queues, qemu-storage-daemon allows multi-conn.
		write_cfg e2e-nbd data 2 "$(hotplug_disk xvda "nbd+unix:///disk0?socket=$sock")"
		if guest_create e2e-nbd; then
			d=$(domid_of e2e-nbd)
			# Read while the guest's disk is connected (its frontend wrote its queues).
			fe=/local/domain/$d/device/vbd/$DEVID
			end=$(deadline $((60 * TIME_SCALE)))
			until [ "$(xenstore-read $fe/state 2>/dev/null)" = 4 ] || ! before "$end"; do sleep 0.2; done
			path=$(device_path "$d")
			nq=$(xenstore-read $fe/multi-queue-num-queues 2>/dev/null || echo 1)
			[ "$path" = "fd handoff" ] || REASON="the backend took the '$path' path, not the fd handoff;"
			if ! wait_gone e2e-nbd 300; then
				REASON="$REASON guest did not finish;"
				dump_guest e2e-nbd
				xl destroy e2e-nbd
			fi
			r=$REASON
			check_no_leaks "$d" || r="$r $REASON"
			REASON=$r
		fi
	fi
	stop_supervisor
	SUP_ARGS=$old_args
	kill $qsd 2>/dev/null
	wait $qsd 2>/dev/null
	if [ -z "$REASON" ]; then
		if ! qemu-img check -q $img >/tmp/qsd.log 2>&1; then
			REASON="qemu-img check: $(tail -n 3 /tmp/qsd.log | tr '\n' ' ')"
		elif ! qemu-img convert -O raw $img $raw >/tmp/qsd.log 2>&1; then
			REASON="qemu-img convert: $(tail -n 3 /tmp/qsd.log | tr '\n' ' ')"
		else
			check_data e2e-nbd xvda $raw
		fi
	fi
	if [ -z "$REASON" ]; then
		result "PASS $s (qcow2 through qemu-storage-daemon, $path, $nq queue(s); image $(du -k $img | cut -f1) KiB, read back through qemu-img)"
	else
		fail_bb $s
	fi
	rm -f $img $raw $sock
}

# ------------------------------------------------------------------ (8) issue 21
# A disk for backend $1 (blkbackd: through blkhotplug; kernel: xen-blkback on a loop
# device made here, KLOOP, released by release_disk).
backend_disk() { # backend vdev image
	case $1 in
	blkbackd) hotplug_disk "$2" "$3" ;;
	kernel)
		[ -n "${KLOOP:-}" ] || KLOOP=$($LOSETUP --show -f "$3") || return 1
		echo "format=raw, vdev=$2, access=rw, backendtype=phy, script=/e2e/phy-script, target=$KLOOP"
		;;
	esac
}
release_disk() {
	[ -z "${KLOOP:-}" ] || $LOSETUP -d "$KLOOP"
	KLOOP=
}
# The backend's set-up: blkbackd's supervisor, or the kernel's module.
backend_up() { # backend
	case $1 in
	blkbackd) have_project "$S" && start_supervisor ;;
	kernel) modprobe xen-blkback || { REASON="cannot load xen-blkback"; return 1; } ;;
	esac
}
backend_fail() { # backend
	if [ "$1" = blkbackd ]; then fail_bb "$S"; else result "FAIL $S: $REASON"; fi
}

# (8a) blkfront without persistent grants: 4096 random O_DIRECT 4 KiB writes at QD 16 in
# the disk's second 64 MiB, six read-back passes, verified in the guest and on the backing
# file; then the perf figures of this path (in the first 64 MiB), with p50 latencies.
nopersist() { # backend
	S=$1-nopersist
	backend_up "$1" || { backend_fail "$1"; return; }
	img=$DISKS/np.img
	make_disk $img 128
	disk=$(backend_disk "$1" xvda $img) || { REASON="no disk"; backend_fail "$1"; return; }
	MEMORY=512 EXTRA_ARGS="e2e.blkfront=feature_persistent=0 e2e.verify=4242:4096:64:64:6 e2e.perfspan=64" \
		write_cfg e2e-np verify,perf 1 "$disk"
	if run_guest e2e-np $((600 + 6 * PERF_SECONDS)); then
		v=$(domu e2e-np verify)
		guest_lines e2e-np | sed -n "s/.*E2E-DOMU perf \([^ ]*\) \(.*\)/E2E-PERF $S \1 \2/p"
		guest_lines e2e-np | sed -n "s/.*E2E-DOMU latency \([^ ]*\) \([0-9]*\) us/E2E-PERF $S \1-p50 \2 us/p"
		case "$v" in
		ok*)
			if out=$(blkverify $img check 4242 4096 64 64 1 16 2>&1); then
				[ "$1" = blkbackd ] && perf_costs "$LAST_DOMID" "$S"
				result "PASS $S (guest: ${v#ok blkverify }; dom0: $(echo "$out" | tail -n 1 | cut -d' ' -f4-7))"
				release_disk
				return
			fi
			REASON="dom0 finds other bytes in $img: $(echo "$out" | tr '\n' ' ' | cut -c1-200)"
			;;
		*) REASON="guest: ${v:-no verify result}" ;;
		esac
	fi
	release_disk
	backend_fail "$1"
}
sc_blkbackd_nopersist() { nopersist blkbackd; }
sc_kernel_nopersist() { nopersist kernel; }

# (8b) Four live detach/attach cycles on a running guest, blkfront reloaded with another
# configuration each time; every earlier region verified after each cycle, all of them in
# dom0 at the end.
ATTACH_CYCLES="max_ring_page_order=0:max_queues=1:max_indirect_segments=0:feature_persistent=0"
ATTACH_CYCLES="$ATTACH_CYCLES/max_ring_page_order=4:max_queues=2:max_indirect_segments=32:feature_persistent=1"
ATTACH_CYCLES="$ATTACH_CYCLES/max_ring_page_order=2:max_queues=1:max_indirect_segments=256:feature_persistent=0"
ATTACH_CYCLES="$ATTACH_CYCLES/max_ring_page_order=1:max_queues=2:max_indirect_segments=256:feature_persistent=1"
attach_cycles() { # backend
	S=$1-attach
	backend_up "$1" || { backend_fail "$1"; return; }
	img=$DISKS/att.img
	make_disk $img 64
	MEMORY=512 EXTRA_ARGS="e2e.cycles=$ATTACH_CYCLES" write_cfg e2e-att cycles 2
	guest_create e2e-att || { backend_fail "$1"; return; }
	d=$LAST_DOMID
	i=1
	for cfg in $(echo "$ATTACH_CYCLES" | tr '/' ' '); do
		if ! wait_domu e2e-att "ready $i" 120; then REASON="cycle $i: blkfront not reloaded ($(domu e2e-att "cycle $i"))"; break; fi
		disk=$(backend_disk "$1" xvdb $img) || { REASON="no disk"; break; }
		progress "$S: cycle $i: attaching"
		if ! timeout $((60 * TIME_SCALE)) xl block-attach e2e-att "$disk" >/e2e/attach.log 2>&1; then
			REASON="cycle $i: block-attach failed: $(tail -n 2 /e2e/attach.log | tr '\n' ' ')"
			break
		fi
		progress "$S: cycle $i: attached"
		if ! wait_domu e2e-att "cycle $i" 120; then REASON="cycle $i: no result from the guest"; break; fi
		c=$(domu e2e-att "cycle $i")
		progress "$S: cycle $i $c"
		case "$c" in ok*) ;; *) REASON="cycle $i ($cfg): $c"; break ;; esac
		if ! timeout $((60 * TIME_SCALE)) xl block-detach e2e-att xvdb >/e2e/detach.log 2>&1; then
			REASON="cycle $i: block-detach failed: $(tail -n 2 /e2e/detach.log | tr '\n' ' ')"
			break
		fi
		if ! wait_domu e2e-att "detached $i" 120; then REASON="cycle $i: xvdb never left the guest"; break; fi
		i=$((i + 1))
	done
	if [ $i -le 4 ]; then
		dump_guest e2e-att
		xl destroy e2e-att
		release_disk
		backend_fail "$1"
		return
	fi
	wait_gone e2e-att 60 || xl destroy e2e-att
	release_disk
	bad=""
	for j in 1 2 3 4; do
		blkverify $img check $((100 + j)) 512 $(((j - 1) * 8)) 8 1 16 >/dev/null 2>&1 || bad="$bad $j"
	done
	if [ -n "$bad" ]; then
		REASON="dom0 finds other bytes in regions$bad of $img"
	elif [ "$1" = kernel ] || check_no_leaks "$d" $img; then
		result "PASS $S (4 cycles)"
		return
	fi
	backend_fail "$1"
}
sc_blkbackd_attach() { attach_cycles blkbackd; }
sc_kernel_attach() { attach_cycles kernel; }

# ------------------------------------------------------------------ (7) kernel blkback and qdisk
sc_qdisk() {
	s=qdisk
	img=$DISKS/qdisk.img
	make_disk $img 128
	write_cfg e2e-qdisk data 1 "format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$img"
	t0=$(uptime_s)
	if run_guest e2e-qdisk 400; then
		if check_data e2e-qdisk xvda $img; then
			result "PASS $s ($(since "$t0") s in dom0)"
			rm -f $img
			return
		fi
	fi
	result "FAIL $s: $REASON"
	ls /var/log/xen/qemu-dm-e2e-qdisk.log >/dev/null 2>&1 && sed 's/^/qemu-dm: /' /var/log/xen/qemu-dm-e2e-qdisk.log | tail -n 20
	rm -f $img
}

sc_kernel_blkback() {
	s=kernel-blkback
	if ! modprobe xen-blkback; then
		REASON="cannot load xen-blkback"
	else
		img=$DISKS/kernel.img
		make_disk $img 128
		l=$($LOSETUP --show -f $img)
		write_cfg e2e-kernel data 1 \
			"format=raw, vdev=xvda, access=rw, backendtype=phy, script=/e2e/phy-script, target=$l"
		t0=$(uptime_s)
		if run_guest e2e-kernel 400; then
			if check_data e2e-kernel xvda $img; then
				result "PASS $s ($(since "$t0") s in dom0)"
				$LOSETUP -d "$l"
				rm -f $img
				rmmod xen-blkback 2>/dev/null
				return
			fi
		fi
		$LOSETUP -d "$l"
		rm -f $img
		rmmod xen-blkback 2>/dev/null
	fi
	result "FAIL $s: $REASON"
}

# ------------------------------------------------------------------ (7) perf, interleaved
# PERF_ROUNDS rounds (E2E_PERF_ROUNDS, default 3); each round runs every backend once, in an
# order rotated by one each round (kernel qdisk blkbackd, then qdisk blkbackd kernel, ...), so
# that none is always first and a drift of the host's speed during the boot hits every
# backend alike; the host reports medians over the rounds and the spread of the per-round
# ratios. Per backend and round two fresh guests on the same 128 MiB image: a 1-vCPU guest
# for the four single-job figures, then a 2-vCPU guest (two queues) for
# rand-read-4k-qd32-2j. PERF_VARIANTS (E2E_PERF_VARIANTS on the host: "label=options,...")
# adds blkbackd-label backends, each served by a supervisor started with those options.
PERF_SUP_ARGS=$SUP_ARGS
PERF_2J=rand-read-4k-qd32-2j
perf_backends() {
	echo kernel qdisk
	if [ -x "$BLKBACKD" ] && [ -x "$BLKHOTPLUG" ]; then
		echo blkbackd
		echo "${PERF_VARIANTS:-}" | tr ',' '\n' | sed -n 's/^\([A-Za-z0-9_.-]*\)=.*/blkbackd-\1/p'
	fi
}
# The supervisor's options for blkbackd or blkbackd-LABEL.
perf_sup_args() { # backend
	[ "$1" = blkbackd ] && { echo "$PERF_SUP_ARGS"; return; }
	echo "${PERF_VARIANTS:-}" | tr ',' '\n' | sed -n "s/^${1#blkbackd-}=//p" | head -n 1
}
# Switch dom0 to backend $1: xen-blkback loaded and no supervisor for the kernel, a
# supervisor with the backend's options and no xen-blkback for blkbackd.
PERF_SUP_CUR=
perf_backend_up() { # backend
	case $1 in
	kernel)
		stop_supervisor
		modprobe xen-blkback || { REASON="cannot load xen-blkback"; return 1; }
		;;
	qdisk) ;;
	blkbackd*)
		if [ -d /sys/module/xen_blkback ]; then
			rmmod xen-blkback 2>/dev/null
			[ -d /sys/module/xen_blkback ] && { REASON="xen-blkback would not unload"; return 1; }
		fi
		a=$(perf_sup_args "$1")
		if [ -z "$SUP_PID" ] || [ "$a" != "$PERF_SUP_CUR" ]; then
			stop_supervisor
			SUP_ARGS=$a
			start_supervisor || return 1
			PERF_SUP_CUR=$a
		fi
		;;
	esac
}
perf_disk() { # backend image -> the guest's disk (kernel: on a loop device, PERF_LOOP)
	case $1 in
	kernel)
		PERF_LOOP=$($LOSETUP --show -f "$2") || return 1
		echo "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/e2e/phy-script, target=$PERF_LOOP"
		;;
	qdisk) echo "format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$2" ;;
	*) hotplug_disk xvda "$2" ;;
	esac
}
perf_release() {
	[ -z "${PERF_LOOP:-}" ] || $LOSETUP -d "$PERF_LOOP"
	PERF_LOOP=
}
# How many queues the 2-vCPU guest's disk got, seen from dom0: the frontend's
# multi-queue-num-queues (absent: one queue), and for kernel blkback its max_queues, for
# blkbackd the serve process's queue threads.
perf_queues() { # backend domid
	f=$(xenstore-read "/local/domain/$2/device/vbd/$DEVID/multi-queue-num-queues" 2>/dev/null || echo 1)
	extra=""
	case $1 in
	kernel) extra=" max_queues=$(cat /sys/module/xen_blkback/parameters/max_queues 2>/dev/null)" ;;
	blkbackd*)
		p=$(serve_pids "$2" | head -n 1)
		t=0
		[ -n "$p" ] && t=$(cat /proc/"$p"/task/*/comm 2>/dev/null | grep -c -- '-q[0-9]')
		extra=" queue_threads=$t"
		;;
	esac
	echo "multi-queue-num-queues=$f$extra"
}
# The CPU time Xen charges dom0 (every backend's work, all of it: dom0's own view cannot
# tell its idle time from the guest running on the same physical CPU) and the guest
# while each figure runs, as E2E-PERF-CPU lines: xl list when the guest says the figure
# starts and when it reports it (each seen within half a second).
xen_cpu() { # name -> "dom0-seconds guest-seconds uptime" ("-" for what xl does not list)
	xl list | awk -v n="$1" -v t="$(uptime_s)" '
		$1 == "Domain-0" { d = $6 } $1 == n { g = $6 } END { print (d == "") ? "-" : d, (g == "") ? "-" : g, t }'
}
perf_cpu() { # name backend round figures...
	pc_n=$1 pc_b=$2 pc_r=$3
	shift 3
	for pc_f in "$@"; do
		perf_cpu_wait "$pc_n" "start $pc_f" || return 0
		pc_c=$(xen_cpu "$pc_n")
		perf_cpu_wait "$pc_n" "perf[-a-z]* $pc_f " || return 0
		echo "E2E-PERF-CPU $pc_b $pc_f $pc_r $pc_c $(xen_cpu "$pc_n")"
	done
}
# Until the guest says $2; 1 at once when it is gone (perf_guest's wait_gone then says
# why), or after as long as a guest may take to boot and run a figure.
perf_cpu_wait() { # name key
	pc_end=$(deadline $(((120 + PERF_SECONDS) * TIME_SCALE)))
	until domu_has "$1" "$2"; do
		domid_of "$1" >/dev/null && before "$pc_end" || return 1
		sleep 0.5
	done
}
# One guest of one backend in one round: its figures as E2E-PERF lines (and, for blkbackd,
# its counters per burst as E2E-COST). kind: 1 (four figures, 1 vCPU) or 2j (2 vCPUs).
perf_guest() { # backend round kind
	b=$1 r=$2
	img=$DISKS/perf.img
	disk=$(perf_disk "$b" "$img") || { PERF_FAIL="$PERF_FAIL $b (round $r): no disk;"; return 1; }
	if [ "$3" = 2j ]; then
		name=e2e-p2-$b
		write_cfg "$name" perf2q 2 "$disk"
	else
		name=e2e-p-$b
		write_cfg "$name" perf 1 "$disk"
	fi
	if ! guest_create "$name"; then
		perf_release
		PERF_FAIL="$PERF_FAIL $b (round $r): $REASON;"
		return 1
	fi
	d=$LAST_DOMID
	if [ "$3" = 2j ] && wait_domu "$name" queues 120; then
		q=$(perf_queues "$b" "$d")
		echo "E2E-PERF-QUEUES $b $r guest: $(domu "$name" queues); dom0: $q"
		case "$b:$q" in
		qdisk:*) ;; # whatever QEMU offers
		*"multi-queue-num-queues=2"*) ;;
		*) PERF_FAIL="$PERF_FAIL $b (round $r): the 2-vCPU guest got no two queues ($q);" ;;
		esac
	fi
	if [ "$3" = 2j ]; then
		perf_cpu "$name" "$b" "$r" $PERF_2J
	else
		perf_cpu "$name" "$b" "$r" $PERF_FIGURES
	fi
	REASON=""
	if ! wait_gone "$name" $((200 + 6 * PERF_SECONDS)); then
		[ -n "$REASON" ] || REASON="guest still running (last: $(guest_lines "$name" | grep E2E-DOMU | tail -n 1))"
		dump_guest "$name"
		xl destroy "$name" >/dev/null 2>&1
		perf_release
		PERF_FAIL="$PERF_FAIL $b (round $r): $REASON;"
		return 1
	fi
	perf_release
	if [ "$3" = 2j ]; then
		collect_perf "$name" "$b" "$r" $PERF_2J
		guest_lines "$name" | sed -n 's/.*E2E-DOMU jobs /jobs: /p' | sed "s|^|perf $b round $r |"
		case $b in blkbackd*) perf_costs "$d" "$b-2j/r$r" ;; esac
	else
		collect_perf "$name" "$b" "$r"
		case $b in blkbackd*) perf_costs "$d" "$b/r$r" ;; esac
	fi
}

# E2E_PROFILE=1: after the rounds, one more blkbackd guest (not counted in the figures) runs
# the figures of PROFILE_FIGURES (E2E_PROFILE_FIGURES: `run` checks the names, puts them in
# the guest's order and defaults to rand-read-4k-qd1 and -qd32)
# for PROF_SECONDS each, 8 s apart, while dom0 records `perf
# record -a -g -e cpu-clock` (TCG has no PMU) over PROF_SECONDS - 3 of them, starting when
# the guest says the figure started (perf's own start-up takes a second or so here, and
# its end longer); the top symbols go out as E2E-PROFILE lines. PROFILE=all: kernel
# blkback too.
PERF_TOOL=/usr/bin/perf
PROF_SECONDS=$((PERF_SECONDS > 10 ? PERF_SECONDS : 10))
perf_profile() { # backend
	b=$1
	perf_backend_up "$b" || { progress "profile $b: $REASON"; return; }
	img=$DISKS/perf.img
	disk=$(perf_disk "$b" "$img") || return
	name=e2e-prof-$b
	figs=$PROFILE_FIGURES
	EXTRA_ARGS="e2e.figures=$(echo $figs | tr ' ' ',') e2e.seconds=$PROF_SECONDS e2e.pause=8" \
		write_cfg "$name" perf 1 "$disk"
	guest_create "$name" || { perf_release; progress "profile $b: $REASON"; return; }
	for fig in $figs; do
		if ! wait_domu "$name" "start $fig" 120; then
			progress "profile $b: no start of $fig"
			break
		fi
		c0=$(xen_cpu "$name")
		HOME=/root $PERF_TOOL record -N -B -a -g -e cpu-clock -F 499 -o "/e2e/prof-$b-$fig.data" \
			-- sleep $((PROF_SECONDS - 3)) >"/e2e/prof-$b-$fig.err" 2>&1 ||
			echo "E2E-PROFILE $b $fig perf record failed: $(tail -n 3 "/e2e/prof-$b-$fig.err" | tr '\n' ' ')"
		echo "$c0 $(xen_cpu "$name")" >"/e2e/prof-$b-$fig.xen"
	done
	wait_gone "$name" $((200 + ($(echo $figs | wc -w) + 1) * PROF_SECONDS)) || xl destroy "$name" >/dev/null 2>&1
	perf_release
	for fig in $figs; do
		f=/e2e/prof-$b-$fig.data
		[ -s "$f" ] || continue
		v=$(domu "$name" "perf $fig")
		{
			echo "== $b $fig (${v:-no figure}; perf record -a -g -e cpu-clock -F 499 over $((PROF_SECONDS - 3)) s of its $PROF_SECONDS s, both dom0 vCPUs)"
			[ -s "/e2e/prof-$b-$fig.xen" ] &&
				awk -v n="$(xl info | awk '$1 == "nr_cpus" { print $3 }')" '{
					if ($1 == "-" || $2 == "-" || $4 == "-" || $5 == "-") exit
					w = $6 - $3; d = $4 - $1; g = $5 - $2
					printf "-- Xen CPU time (xl list) over the %.1f s of the recording: dom0 %.1f s, the guest %.1f s; %.0f %% of the %d physical CPUs busy in the two\n", w, d, g, 100 * (d + g) / (n * w), n
				}' "/e2e/prof-$b-$fig.xen"
			echo "-- by command (share of all samples; swapper = dom0 idle)"
			HOME=/root $PERF_TOOL report -i "$f" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep . | head -n 12
			echo "-- top symbols (self), all of dom0"
			HOME=/root $PERF_TOOL report -i "$f" --stdio --no-children --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep . | head -n 25
			echo "-- top symbols (self) by command, idle left out"
			HOME=/root $PERF_TOOL report -i "$f" --stdio --no-children --sort comm,dso,sym -g none 2>/dev/null | grep -v '^#' | grep . | grep -v ' swapper ' | head -n 30
			# The backend's own threads (blkbackd's serve process and queue threads, or
			# kernel blkback's D.xvda-N threads) and the kernel's workers that serve
			# them (the loop device's kworkers, softirqs: block completions, blkback's
			# unmap-and-respond callbacks).
			case $b in
			kernel) re='^([0-9]+[.]xvd|blkback|kworker|ksoftirqd)' ;;
			*) re='^(vbd-|blkbackd|kworker|ksoftirqd)' ;;
			esac
			c=$(HOME=/root $PERF_TOOL report -i "$f" --stdio --no-children --sort comm -g none 2>/dev/null |
				awk -v re="$re" '$2 ~ re { printf "%s%s", s, $2; s = "," }')
			if [ -n "$c" ]; then
				echo "-- call chains (callee first) in $c, symbols with 2 % or more of all samples"
				HOME=/root $PERF_TOOL report -i "$f" --stdio --no-children --comms "$c" --sort comm,sym \
					-g graph,0.5,callee,function,percent --percent-limit 2 2>/dev/null | grep -v '^#' | grep . | head -n 120
			fi
		} 2>&1 | sed "s/^/E2E-PROFILE $b $fig /"
	done
}

sc_perf() {
	s=perf
	make_disk $DISKS/perf.img 128
	rounds=${PERF_ROUNDS:-3}
	backends=$(perf_backends | tr '\n' ' ')
	nb=$(echo $backends | wc -w)
	r=1
	while [ $r -le "$rounds" ]; do
		# Rotate: round r starts at the ((r - 1) mod n)th backend.
		set -- $backends
		i=1
		while [ $i -lt $(((r - 1) % nb + 1)) ]; do
			x=$1
			shift
			set -- "$@" "$x"
			i=$((i + 1))
		done
		echo "E2E-PERF-ORDER $r $*"
		progress "perf round $r of $rounds: $*"
		for b in "$@"; do
			pt0=$(uptime_s)
			if perf_backend_up "$b"; then
				perf_guest "$b" "$r" 1
				perf_guest "$b" "$r" 2j
			else
				PERF_FAIL="$PERF_FAIL $b (round $r): $REASON;"
			fi
			progress "perf round $r: $b took $(since "$pt0") s"
		done
		r=$((r + 1))
	done
	case "${PROFILE:-0}" in
	0 | "") ;;
	*)
		if [ ! -x $PERF_TOOL ]; then
			progress "profile: no perf in dom0"
		else
			[ -x "$BLKBACKD" ] && perf_profile blkbackd
			[ "$PROFILE" = all ] && perf_profile kernel
		fi
		;;
	esac
	stop_supervisor
	SUP_ARGS=$PERF_SUP_ARGS
	rmmod xen-blkback 2>/dev/null
	case "$PERF_DONE" in *kernel*qdisk* | *qdisk*kernel*) ;; *) PERF_FAIL="$PERF_FAIL no figures from kernel blkback and qdisk;" ;; esac
	if [ -n "$PERF_FAIL" ]; then
		result "FAIL perf:$PERF_FAIL"
	elif [ -x "$BLKBACKD" ]; then
		result "PASS perf ($rounds rounds; figures for:$PERF_DONE)"
	else
		result "PASS perf ($rounds rounds; figures for:$PERF_DONE; blkbackd not built, so no blkbackd column)"
	fi
}

# ------------------------------------------------------------------ (9) kernel-patched
# dom0 runs the 6.12 kernel built with kernel-patches/ (tests/e2e/run builds it; xen-blkback,
# loop and device-mapper built in), so the guest's disks are served by the series' blkback
# through blkhotplug: blkhotplug sees `opened` (written by blkback at probe), writes
# `physical-device` as diskseq@major:minor and waits for `opened` = 1; blkback opens the
# device, checks the diskseq and says so. (a) a file (an autoclear loop device), (b) a
# `linear:` device-mapper device over a loop device (DM_FILE_DESCRIPTOR_FLAG with deferred
# remove), both gone once the guest is; (c) a hotplug script that writes a wrong diskseq is
# refused: an error in XenStore, the kernel's warning in dom0's log, no disk in the guest.

# The sysfs name of the block device that physical-device's diskseq@major:minor names, when
# the device's diskseq is that one.
pd_device() { # physical-device
	case "$1" in *@*:*) ;; *) return 1 ;; esac
	seq=${1%@*} mm=${1#*@}
	want="$((0x${mm%:*})):$((0x${mm#*:}))"
	for b in /sys/block/*; do
		[ "$(cat "$b/dev")" = "$want" ] || continue
		[ "$(printf %x "$(cat "$b/diskseq")")" = "$seq" ] || return 1
		basename "$b"
		return 0
	done
	return 1
}

# One guest with a data check on a disk blkhotplug makes from $2; KP_INFO says what was seen.
kp_guest() { # name target
	write_cfg "$1" data 1 "$(hotplug_disk xvda "$2")"
	guest_create "$1" || return 1
	KP_DOMID=$LAST_DOMID
	be=/local/domain/0/backend/vbd/$KP_DOMID/$DEVID
	wait_domu "$1" boot 60
	pd=$(xenstore-read $be/physical-device 2>/dev/null)
	opened=$(xenstore-read $be/opened 2>/dev/null)
	KP_DEV=$(pd_device "$pd")
	KP_INFO="physical-device $pd ($KP_DEV), opened=$opened"
	progress "kernel-patched: $1: $KP_INFO"
	REASON=""
	if ! wait_gone "$1" 400; then
		[ -n "$REASON" ] || REASON="$1: guest did not finish"
		dump_guest "$1"
		xl destroy "$1"
		return 1
	fi
	if [ -z "$KP_DEV" ]; then
		REASON="$1: physical-device '$pd' is not diskseq@major:minor of a device with that diskseq"
	elif [ "$opened" != 1 ]; then
		REASON="$1: blkback wrote opened='$opened', not 1"
	else
		return 0
	fi
	dump_guest "$1"
	return 1
}

sc_kernel_patched() {
	s=kernel-patched
	[ -x "$BLKHOTPLUG" ] || { result "SKIP $s: blkhotplug not built"; return; }
	[ -e /e2e/kernel-builtin ] || { result "FAIL $s: dom0 does not run the patched kernel"; return; }
	progress "kernel-patched: dom0 kernel $(uname -r)"
	# (a) a file: blkhotplug's autoclear loop device, gone with the guest.
	img=$DISKS/kp.img
	make_disk $img 128
	if ! kp_guest e2e-kp $img; then result "FAIL $s: file: $REASON"; return; fi
	case $KP_DEV in loop*) ;; *) result "FAIL $s: file: served from $KP_DEV, not a loop device"; return ;; esac
	check_data e2e-kp xvda $img || { result "FAIL $s: file: $REASON"; return; }
	check_no_leaks "$KP_DOMID" $img || { result "FAIL $s: file: $REASON"; return; }
	file_info=$KP_INFO
	rm -f $img
	# (b) linear: over a loop device: a device-mapper device, gone with the guest.
	img=$DISKS/kpdm.img
	make_disk $img 128
	l=$($LOSETUP --show -f $img) || { result "FAIL $s: losetup failed"; return; }
	ndm_before=$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)
	if ! kp_guest e2e-kpdm "linear:$l"; then
		$LOSETUP -d "$l"
		result "FAIL $s: dm: $REASON"
		return
	fi
	REASON=""
	case $KP_DEV in dm-*) ;; *) REASON="dm: served from $KP_DEV, not a device-mapper device" ;; esac
	# blkhotplug says which way it made the device (its stderr is xl's).
	dm_path=$(cat /e2e/e2e-kpdm.xl.log /var/log/xen/xl-e2e-kpdm.log 2>/dev/null |
		grep -o -m1 -e "from DM_TABLE_LOAD's fd ([^)]*)" -e "opened by path and checked by uuid ([^)]*)")
	case $dm_path in
	*"DM_TABLE_LOAD's fd"*) KP_INFO="$KP_INFO, $dm_path" ;;
	*) REASON="$REASON dm: blkhotplug did not take the fd-returning path: ${dm_path:-it said nothing}" ;;
	esac
	if [ -z "$REASON" ] && check_data e2e-kpdm xvda $img && check_no_leaks "$KP_DOMID"; then
		end=$(deadline 10)
		while [ -e "/sys/block/$KP_DEV" ] && before "$end"; do sleep 0.5; done
		[ -e "/sys/block/$KP_DEV" ] && REASON="dm: $KP_DEV ($(cat /sys/block/$KP_DEV/dm/name)) left after the guest"
		[ "$(ls -d /sys/block/dm-* 2>/dev/null | wc -l)" -eq "$ndm_before" ] ||
			REASON="$REASON dm: device-mapper devices left: $(ls -d /sys/block/dm-* | tr '\n' ' ')"
	else
		REASON="dm: $REASON"
	fi
	$LOSETUP -d "$l"
	[ -z "$REASON" ] || { result "FAIL $s: $REASON"; return; }
	dm_info=$KP_INFO
	rm -f $img
	# (c) a wrong diskseq: refused by blkback.
	img=$DISKS/kpseq.img
	make_disk $img 64
	l=$($LOSETUP --show -f $img)
	bad_diskseq_script
	write_cfg e2e-kpseq probe 1 "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/e2e/bad-diskseq-script, target=$l"
	guest_create e2e-kpseq || progress "kernel-patched: mismatch: $REASON"
	d=$(domid_of e2e-kpseq)
	wait_domu e2e-kpseq probe 60
	err=$(wait_error_node "$d")
	warn=$(dmesg | tail -n +$((KLOG_START + 1)) | grep -m1 'has diskseq .*, expected' | sed 's/^\[[^]]*\] *//')
	opened=$(xenstore-read /local/domain/0/backend/vbd/$d/$DEVID/opened 2>/dev/null)
	probe=$(domu e2e-kpseq probe)
	xl destroy e2e-kpseq 2>/dev/null
	$LOSETUP -d $l
	REASON=""
	[ -n "$err" ] || REASON="mismatch: no error in XenStore;"
	[ -n "$warn" ] || REASON="$REASON mismatch: no diskseq warning in dom0's kernel log;"
	[ "$opened" != 1 ] || REASON="$REASON mismatch: blkback wrote opened=1;"
	case "$probe" in *read-ok*) REASON="$REASON mismatch: the guest could read the refused disk;" ;; esac
	if [ -z "$REASON" ] && check_no_leaks "$d" $img; then
		result "PASS $s (file: $file_info; dm: $dm_info; wrong diskseq refused: XenStore error '$err', dom0 kernel: '$warn'; guest: $probe)"
	else
		dmesg | tail -n 20 | sed 's/^/dom0 kernel: /'
		result "FAIL $s: $REASON"
	fi
	rm -f $img
}

# ------------------------------------------------------------------ main
# One scenario with its kernel-log mark and trace, then whatever it left behind removed.
run_scenario() { # name
	progress "scenario $1"
	t0=$(uptime_s)
	klog_mark
	ktrace_start
	sc_$(echo "$1" | tr - _)
	ktrace_report "$1"
	progress "scenario $1 took $(since "$t0") s"
	for g in $(xl list 2>/dev/null | awk 'NR > 1 && $1 != "Domain-0" { print $1 }'); do xl destroy "$g"; done
	rm -f $DISKS/*
}
PERF_DONE="" PERF_FAIL=""
for s in blkbackd-file blkbackd-handoff blkbackd-record blkbackd-features blkbackd-lifecycle blkbackd-restart blkhotplug-dm diskseq-mismatch \
	blkbackd-nopersist blkbackd-attach blkbackd-nbd; do
	selected $s || continue
	run_scenario $s
done
# The performance figures, every backend in every round (it leaves neither the supervisor
# nor xen-blkback behind).
selected perf && run_scenario perf
# blkbackd's supervisor watches backend/vbd too: stop it before the kernel
# backend, or two backends answer the same frontend (blkfront 6.1 hits a BUG).
stop_supervisor
# The kernel backend last: once xen-blkback is loaded it claims every vbd.
for s in qdisk kernel-blkback; do
	selected $s || continue
	run_scenario $s
done
# The same scenarios as blkbackd-nopersist and -attach on the kernel's blkback, as their
# reference in the same boot.
for s in kernel-nopersist kernel-attach; do
	selected $s || continue
	run_scenario $s
done
# Alone in its boot (tests/e2e/run): dom0's kernel is the series' one.
selected kernel-patched && run_scenario kernel-patched
rmmod xen-blkback 2>/dev/null

