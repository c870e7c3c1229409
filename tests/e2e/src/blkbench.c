/*
 * blkbench: a small fio-like block workload for the e2e guest.
 *
 * fio in Debian links librados, librbd, glusterfs and more, far too much for
 * a guest initramfs, so the guest runs this instead: O_DIRECT I/O of a fixed
 * block size at a fixed queue depth, kept in flight with Linux native AIO
 * (io_setup/io_submit/io_getevents as raw system calls, no libaio), for a
 * fixed time. Built static on the host by tests/e2e/run.
 *
 * usage: blkbench DEVICE read|write|randread|randwrite BLOCK_BYTES QUEUE_DEPTH SECONDS [SPAN_MIB]
 * environment: BLKBENCH_SEED=N seeds the random offsets (jobs run side by side give each a
 * seed of its own, so that they do not read the same blocks in step).
 * prints: mode=.. bs=.. qd=.. ios=.. secs=.. mibps=.. iops=.. p50us=.. (median completion latency)
 * exit status 0 when every I/O completed with its full length, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include "aio.h"
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t xorshift64(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: %s DEVICE read|write|randread|randwrite BLOCK_BYTES QUEUE_DEPTH SECONDS [SPAN_MIB]\n", argv[0]);
		return 2;
	}
	const char *dev = argv[1], *mode = argv[2];
	long bs = atol(argv[3]), qd = atol(argv[4]);
	double secs = atof(argv[5]);
	int is_write = !strcmp(mode, "write") || !strcmp(mode, "randwrite");
	int is_rand = !strncmp(mode, "rand", 4);
	if (strcmp(mode, "read") && strcmp(mode, "write") && strcmp(mode, "randread") && strcmp(mode, "randwrite")) {
		fprintf(stderr, "blkbench: unknown mode %s\n", mode);
		return 2;
	}
	if (bs < 512 || bs % 512 || qd < 1 || qd > 256 || secs <= 0) {
		fprintf(stderr, "blkbench: bad block size, queue depth or seconds\n");
		return 2;
	}
	int fd = open(dev, (is_write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror("blkbench: open");
		return 1;
	}
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
		off_t end = lseek(fd, 0, SEEK_END);
		if (end < 0) {
			perror("blkbench: size");
			return 1;
		}
		size = end;
	}
	if (argc > 6) {
		uint64_t span = (uint64_t)atol(argv[6]) << 20;
		if (span && span < size)
			size = span;
	}
	const char *seed = getenv("BLKBENCH_SEED");
	if (seed && *seed)
		rng_state ^= (uint64_t)strtoull(seed, NULL, 0) * 0xbf58476d1ce4e5b9ULL;
	if (!rng_state)
		rng_state = 1;
	uint64_t blocks = size / bs;
	if (blocks < 1) {
		fprintf(stderr, "blkbench: device smaller than one block\n");
		return 1;
	}

	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, qd, &ctx) < 0) {
		perror("blkbench: io_setup");
		return 1;
	}
	struct iocb *cbs = calloc(qd, sizeof(*cbs));
	struct iocb **ptrs = calloc(qd, sizeof(*ptrs));
	struct io_event *events = calloc(qd, sizeof(*events));
	char *busy = calloc(qd, 1);
	double *issued = calloc(qd, sizeof(*issued));
	/* Completion latencies, the first million. */
	size_t nlat = 0, maxlat = 1 << 20;
	double *lat = malloc(maxlat * sizeof(*lat));
	if (!cbs || !ptrs || !events || !busy || !issued || !lat)
		return 1;
	uint64_t next_block = 0;
	for (long i = 0; i < qd; i++) {
		void *buf;
		if (posix_memalign(&buf, 4096, bs))
			return 1;
		memset(buf, 0x5a ^ (int)i, bs);
		cbs[i].aio_fildes = fd;
		cbs[i].aio_lio_opcode = is_write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
		cbs[i].aio_buf = (uintptr_t)buf;
		cbs[i].aio_nbytes = bs;
		cbs[i].aio_data = i;
	}

	long inflight = 0, errors = 0;
	uint64_t ios = 0;
	double start = now(), deadline = start + secs;
	int stopping = 0;
	for (;;) {
		/* (Re)submit every idle slot, one io_submit for the batch. */
		long n = 0;
		if (!stopping) {
			for (long i = 0; i < qd; i++) {
				if (!busy[i]) {
					uint64_t blk = is_rand ? xorshift64() % blocks : next_block++ % blocks;
					cbs[i].aio_offset = blk * bs;
					issued[i] = now();
					busy[i] = 1;
					ptrs[n++] = &cbs[i];
				}
			}
		}
		if (n) {
			if (aio_submit_all(ctx, ptrs, n, "blkbench"))
				return 1;
			inflight += n;
		}
		if (!inflight)
			break;
		long got = aio_reap(ctx, events, qd, "blkbench");
		if (got < 0)
			return 1;
		for (long e = 0; e < got; e++) {
			struct iocb *cb = (struct iocb *)(uintptr_t)events[e].obj;
			if (events[e].res != bs) {
				if (errors < 5)
					fprintf(stderr, "blkbench: I/O at %llu returned %lld\n",
						(unsigned long long)cb->aio_offset, (long long)events[e].res);
				errors++;
			}
			if (nlat < maxlat)
				lat[nlat++] = now() - issued[cb->aio_data];
			busy[cb->aio_data] = 0;
			inflight--;
			ios++;
		}
		if (!stopping && now() >= deadline)
			stopping = 1;
	}
	double elapsed = now() - start;
	qsort(lat, nlat, sizeof(*lat), cmp_double);
	printf("mode=%s bs=%ld qd=%ld ios=%llu secs=%.3f mibps=%.2f iops=%.1f errors=%ld p50us=%.0f\n",
	       mode, bs, qd, (unsigned long long)ios, elapsed,
	       ios * (double)bs / elapsed / 1048576.0, ios / elapsed, errors,
	       nlat ? lat[nlat / 2] * 1e6 : 0.0);
	syscall(SYS_io_destroy, ctx);
	close(fd);
	return errors ? 1 : 0;
}
