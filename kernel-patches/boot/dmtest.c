// SPDX-License-Identifier: GPL-2.0
/*
 * Boot test of the device-mapper part of the series: DM_TABLE_LOAD with
 * DM_FILE_DESCRIPTOR_FLAG (and DM_DEFERRED_REMOVE).  Runs as init's child in
 * the test VM, as root, with devtmpfs on /dev and sysfs on /sys.  Prints one
 * PASS/FAIL line per check and "N passed, N failed" at the end; exits 0 only
 * if everything passed.
 *
 * Build: gcc -static -O2 -Wall -Wextra -I <patched uapi headers> dmtest.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/dm-ioctl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SECTORS 2048 /* 1 MiB test devices */

static int passed, failed;

static void result(int ok, const char *name, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		passed++;
		printf("PASS %s\n", name);
	} else {
		failed++;
		printf("FAIL %s: ", name);
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		printf(" (errno %d %s)\n", errno, strerror(errno));
	}
	fflush(stdout);
}

#define CHECK(cond, name, ...) result(!!(cond), name, __VA_ARGS__)

static int control = -1;

/* A dm_ioctl followed by room for one target and its parameters. */
struct dm_buf {
	struct dm_ioctl io;
	struct dm_target_spec spec;
	char params[256];
};

static void dm_init(struct dm_buf *b, const char *name)
{
	memset(b, 0, sizeof(*b));
	b->io.version[0] = DM_VERSION_MAJOR;
	b->io.version[1] = 0;
	b->io.version[2] = 0;
	b->io.data_size = sizeof(*b);
	b->io.data_start = sizeof(b->io);
	if (name)
		snprintf(b->io.name, sizeof(b->io.name), "%s", name);
}

static int dm(unsigned long cmd, struct dm_buf *b)
{
	return ioctl(control, cmd, &b->io);
}

static int dm_create(const char *name)
{
	struct dm_buf b;

	dm_init(&b, name);
	snprintf(b.io.uuid, sizeof(b.io.uuid), "BLKBACKD-TEST-%s", name);
	return dm(DM_DEV_CREATE, &b);
}

/* Load a linear table over @backing; @flags go into dm_ioctl.flags. */
static int dm_load(const char *name, dev_t backing, uint32_t flags,
		   struct dm_buf *b)
{
	dm_init(b, name);
	b->io.flags = flags;
	b->io.padding = 0xdeadbeef; /* must stay untouched without the flag */
	b->io.target_count = 1;
	b->spec.sector_start = 0;
	b->spec.length = SECTORS;
	b->spec.next = 0;
	snprintf(b->spec.target_type, sizeof(b->spec.target_type), "linear");
	snprintf(b->params, sizeof(b->params), "%u:%u 0", major(backing),
		 minor(backing));
	return dm(DM_TABLE_LOAD, b);
}

static int dm_resume(const char *name)
{
	struct dm_buf b;

	dm_init(&b, name);
	return dm(DM_DEV_SUSPEND, &b);
}

/* 1 if the device exists, 0 if not, -1 on other errors. */
static int dm_exists(const char *name, struct dm_buf *b)
{
	dm_init(b, name);
	if (dm(DM_DEV_STATUS, b) == 0)
		return 1;
	return errno == ENXIO ? 0 : -1;
}

static int dm_remove(const char *name)
{
	struct dm_buf b;

	dm_init(&b, name);
	return dm(DM_DEV_REMOVE, &b);
}

/* Deferred removal runs from a workqueue: wait up to 5 s for it. */
static int dm_gone(const char *name)
{
	struct dm_buf b;
	int i;

	for (i = 0; i < 500; i++) {
		int r = dm_exists(name, &b);

		if (r <= 0)
			return r == 0;
		usleep(10000);
	}
	return 0;
}

static dev_t dm_dev(const struct dm_buf *b)
{
	/* huge_decode_dev() of the kernel's encoding */
	uint64_t d = b->io.dev;

	return makedev((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00));
}

static long long sysfs_diskseq(dev_t dev)
{
	char path[64], buf[32];
	long long v = -1;
	int fd;
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/diskseq", major(dev),
		 minor(dev));
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n > 0) {
		buf[n] = 0;
		v = strtoll(buf, NULL, 10);
	}
	close(fd);
	return v;
}

/* dm_destroy() runs after the device leaves the name hash: wait for it. */
static int sysfs_gone(dev_t dev)
{
	int i;

	for (i = 0; i < 500; i++) {
		if (sysfs_diskseq(dev) == -1)
			return 1;
		usleep(10000);
	}
	return 0;
}

static int count_fds(void)
{
	int n = 0, fd;

	for (fd = 0; fd < 1024; fd++)
		if (fcntl(fd, F_GETFD) >= 0)
			n++;
	return n;
}

static dev_t backing_dev;
static int backing_file = -1;

/* A loop device over a 1 MiB tmpfs file, the target of the linear tables. */
static int setup_backing(void)
{
	struct loop_config cfg;
	char path[32];
	struct stat st;
	int ctl, nr, lfd;

	backing_file = open("/tmp/backing", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (backing_file < 0 || ftruncate(backing_file, SECTORS * 512) < 0)
		return -1;
	ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl < 0)
		return -1;
	nr = ioctl(ctl, LOOP_CTL_GET_FREE);
	close(ctl);
	if (nr < 0)
		return -1;
	snprintf(path, sizeof(path), "/dev/loop%d", nr);
	lfd = open(path, O_RDWR | O_CLOEXEC);
	if (lfd < 0)
		return -1;
	memset(&cfg, 0, sizeof(cfg));
	cfg.fd = backing_file;
	if (ioctl(lfd, LOOP_CONFIGURE, &cfg) < 0 || fstat(lfd, &st) < 0)
		return -1;
	backing_dev = st.st_rdev;
	/* lfd stays open: the loop device must outlive the tests. */
	return 0;
}

static void test_version(void)
{
	struct dm_buf b;
	int r;

	dm_init(&b, NULL);
	r = dm(DM_VERSION, &b);
	printf("device-mapper interface %u.%u.%u\n", b.io.version[0],
	       b.io.version[1], b.io.version[2]);
	CHECK(r == 0 && b.io.version[0] == 4 && b.io.version[1] >= 49,
	      "version: DM_VERSION reports 4.49 or later", "got %u.%u",
	      b.io.version[0], b.io.version[1]);
}

/* The main path: fd arrives, is the device, does I/O, device goes on close. */
static void test_fd_deferred(void)
{
	const char *name = "fd-deferred";
	char wbuf[4096], rbuf[4096];
	unsigned long long seq = 0, size = 0;
	struct dm_buf b, s;
	struct stat st;
	int fd, before, fl;
	dev_t dev;

	CHECK(dm_create(name) == 0, "fd+deferred: DM_DEV_CREATE", "create");
	before = count_fds();
	CHECK(dm_load(name, backing_dev,
		      DM_FILE_DESCRIPTOR_FLAG | DM_DEFERRED_REMOVE, &b) == 0,
	      "fd+deferred: DM_TABLE_LOAD with DM_FILE_DESCRIPTOR_FLAG",
	      "table load");
	fd = b.io.fd;
	dev = dm_dev(&b);
	CHECK(fd >= 0 && fcntl(fd, F_GETFD) == FD_CLOEXEC &&
		      count_fds() == before + 1,
	      "fd+deferred: a new O_CLOEXEC descriptor arrives in dm_ioctl.fd",
	      "fd %d, fds %d -> %d", fd, before, count_fds());
	fl = fcntl(fd, F_GETFL);
	CHECK(fl >= 0 && (fl & O_ACCMODE) == O_RDWR,
	      "fd+deferred: descriptor is read-write", "flags %#x", fl);
	/* DM_TABLE_LOAD echoes input flags: ask DM_DEV_STATUS afresh. */
	CHECK(dm_exists(name, &s) == 1 && (s.io.flags & DM_DEFERRED_REMOVE) &&
		      (b.io.flags & DM_INACTIVE_PRESENT_FLAG),
	      "fd+deferred: device is scheduled for deferred removal",
	      "status flags %#x, load flags %#x", s.io.flags, b.io.flags);
	CHECK(fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && st.st_rdev == dev,
	      "fd+deferred: fstat gives the created block device",
	      "rdev %u:%u, dev %u:%u", major(st.st_rdev), minor(st.st_rdev),
	      major(dev), minor(dev));
	CHECK(ioctl(fd, BLKGETDISKSEQ, &seq) == 0 && seq != 0 &&
		      (long long)seq == sysfs_diskseq(dev),
	      "fd+deferred: BLKGETDISKSEQ matches sysfs diskseq of the device",
	      "ioctl %llu, sysfs %lld", seq, sysfs_diskseq(dev));
	CHECK(b.io.open_count == 1, "fd+deferred: open count is 1",
	      "open_count %d", b.io.open_count);

	CHECK(dm_resume(name) == 0, "fd+deferred: resume makes the table live",
	      "resume");
	CHECK(ioctl(fd, BLKGETSIZE64, &size) == 0 && size == SECTORS * 512ULL,
	      "fd+deferred: descriptor sees the size after resume", "size %llu",
	      size);
	memset(wbuf, 0x5a, sizeof(wbuf));
	snprintf(wbuf, sizeof(wbuf), "written through the dm fd");
	CHECK(pwrite(fd, wbuf, sizeof(wbuf), 8192) == (ssize_t)sizeof(wbuf) &&
		      fsync(fd) == 0,
	      "fd+deferred: pwrite + fsync through the descriptor", "pwrite");
	memset(rbuf, 0, sizeof(rbuf));
	CHECK(pread(fd, rbuf, sizeof(rbuf), 8192) == (ssize_t)sizeof(rbuf) &&
		      memcmp(rbuf, wbuf, sizeof(rbuf)) == 0,
	      "fd+deferred: pread through the descriptor reads it back",
	      "pread");
	memset(rbuf, 0, sizeof(rbuf));
	CHECK(pread(backing_file, rbuf, sizeof(rbuf), 8192) ==
			      (ssize_t)sizeof(rbuf) &&
		      memcmp(rbuf, wbuf, sizeof(rbuf)) == 0,
	      "fd+deferred: the data reached the backing file", "backing");

	CHECK(close(fd) == 0 && dm_gone(name),
	      "fd+deferred: device removed after the last close", "still there");
	CHECK(access("/sys/dev/block", F_OK) == 0 && sysfs_gone(dev),
	      "fd+deferred: its sysfs node is gone too", "diskseq %lld",
	      sysfs_diskseq(dev));
}

/* Deferred removal waits for the last opener, not for the returned fd. */
static void test_other_opener(void)
{
	const char *name = "other-opener";
	char path[64];
	struct dm_buf b, s;
	int fd, other;
	dev_t dev;

	dm_create(name);
	CHECK(dm_load(name, backing_dev,
		      DM_FILE_DESCRIPTOR_FLAG | DM_DEFERRED_REMOVE, &b) == 0,
	      "other opener: table load with fd", "load");
	fd = b.io.fd;
	dev = dm_dev(&b);
	snprintf(path, sizeof(path), "/dev/block/%u:%u", major(dev), minor(dev));
	mknod(path, S_IFBLK | 0600, dev);
	other = open(path, O_RDONLY | O_CLOEXEC);
	CHECK(other >= 0, "other opener: open the node too", "%s", path);
	close(fd);
	usleep(100000);
	CHECK(dm_exists(name, &s) == 1 && s.io.open_count == 1,
	      "other opener: device stays while another opener holds it",
	      "open_count %d", s.io.open_count);
	close(other);
	CHECK(dm_gone(name), "other opener: removed when the last opener closes",
	      "still there");
	unlink(path);
}

/* A process killed after the ioctl leaks nothing. */
static void test_killed(void)
{
	const char *name = "killed";
	int status = 0;
	pid_t pid;

	pid = fork();
	if (pid == 0) {
		struct dm_buf b;

		if (dm_create(name) ||
		    dm_load(name, backing_dev,
			    DM_FILE_DESCRIPTOR_FLAG | DM_DEFERRED_REMOVE, &b) ||
		    dm_resume(name))
			_exit(1);
		/* die without closing or removing anything */
		kill(getpid(), SIGKILL);
		_exit(2);
	}
	waitpid(pid, &status, 0);
	CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
	      "killed: child created the device and was killed", "status %#x",
	      status);
	CHECK(dm_gone(name), "killed: device removed when the kernel closed its fd",
	      "still there");
}

/* The flag without DM_DEFERRED_REMOVE: fd, but the device stays. */
static void test_fd_only(void)
{
	const char *name = "fd-only";
	struct dm_buf b, s;

	dm_create(name);
	CHECK(dm_load(name, backing_dev, DM_FILE_DESCRIPTOR_FLAG, &b) == 0 &&
		      b.io.fd >= 0 && dm_exists(name, &s) == 1 &&
		      !(s.io.flags & DM_DEFERRED_REMOVE),
	      "fd only: descriptor without deferred remove", "fd %d flags %#x",
	      b.io.fd, b.io.flags);
	close(b.io.fd);
	usleep(100000);
	CHECK(dm_exists(name, &s) == 1 && s.io.open_count == 0,
	      "fd only: device stays after close", "exists %d",
	      dm_exists(name, &s));
	CHECK(dm_remove(name) == 0, "fd only: DM_DEV_REMOVE still works",
	      "remove");
}

/* DM_READONLY_FLAG gives a read-only descriptor. */
static void test_readonly(void)
{
	const char *name = "readonly";
	char buf[512] = { 0 };
	struct dm_buf b;
	int fl;

	dm_create(name);
	CHECK(dm_load(name, backing_dev,
		      DM_FILE_DESCRIPTOR_FLAG | DM_DEFERRED_REMOVE |
			      DM_READONLY_FLAG,
		      &b) == 0 && b.io.fd >= 0,
	      "read-only: table load with fd", "load");
	fl = fcntl(b.io.fd, F_GETFL);
	CHECK(fl >= 0 && (fl & O_ACCMODE) == O_RDONLY &&
		      pwrite(b.io.fd, buf, sizeof(buf), 0) < 0 && errno == EBADF,
	      "read-only: descriptor is O_RDONLY and refuses writes",
	      "flags %#x", fl);
	close(b.io.fd);
	CHECK(dm_gone(name), "read-only: removed on close", "still there");
}

/* Without the flag, DM_TABLE_LOAD behaves exactly as before. */
static void test_without_flag(void)
{
	const char *name = "no-flag";
	struct dm_buf b, s;
	int before = count_fds();

	dm_create(name);
	/* DM_DEFERRED_REMOVE alone was always ignored by DM_TABLE_LOAD. */
	CHECK(dm_load(name, backing_dev, DM_DEFERRED_REMOVE, &b) == 0,
	      "no flag: table load", "load");
	CHECK(b.io.padding == 0xdeadbeef && count_fds() == before,
	      "no flag: no descriptor, padding untouched",
	      "padding %#x, fds %d -> %d", b.io.padding, before, count_fds());
	CHECK(dm_exists(name, &s) == 1 && !(s.io.flags & DM_DEFERRED_REMOVE),
	      "no flag: DM_DEFERRED_REMOVE on DM_TABLE_LOAD still ignored",
	      "status flags %#x", s.io.flags);
	dm_resume(name);
	usleep(100000);
	CHECK(dm_exists(name, &s) == 1 && s.io.open_count == 0,
	      "no flag: device stays, nobody holds it open", "exists");
	CHECK(dm_remove(name) == 0 && dm_gone(name),
	      "no flag: removed by DM_DEV_REMOVE", "remove");
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (control < 0 || setup_backing() < 0) {
		perror("setup (/dev/mapper/control, loop device)");
		printf("0 passed, 1 failed\n");
		return 1;
	}
	test_version();
	test_fd_deferred();
	test_other_opener();
	test_killed();
	test_fd_only();
	test_readonly();
	test_without_flag();
	printf("dmtest: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
