/*
 * blkverify: write random blocks of a region with O_DIRECT and read them back,
 * verifying every byte, for the e2e guest (and, on the backing file, for dom0).
 *
 * usage: blkverify TARGET write|mix|check SEED NBLOCKS REGION_MIB_OFFSET REGION_MIB PASSES QD
 *   write: writes NBLOCKS distinct 4 KiB blocks chosen by SEED inside the region,
 *          each with contents derived from SEED and its block number, then reads
 *          them all back PASSES times;
 *   mix:   the same writes with a read of a block already written (chosen by SEED)
 *          between every two of them, reads and writes in flight together, like
 *          fio's randrw; then the PASSES read passes;
 *   check: only the PASSES read passes (a region written earlier).
 * I/O is Linux native AIO at queue depth QD. TARGET is opened with O_DIRECT, or
 * without it where the file system refuses it (tmpfs in dom0).
 * prints: blkverify mode=.. blocks=.. passes=.. ios=.. errors=.. mismatches=.. secs=..
 * exit status 0 when every I/O completed in full and every byte matched.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include "aio.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static void pattern(uint64_t seed, uint64_t block, unsigned char *buf)
{
	for (int w = 0; w < BS / 8; w++) {
		uint64_t v = mix(seed * 0x9e3779b97f4a7c15ULL ^ mix(block * 4096 + w));
		memcpy(buf + w * 8, &v, 8);
	}
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 9) {
		fprintf(stderr, "usage: %s TARGET write|mix|check SEED NBLOCKS REGION_MIB_OFFSET REGION_MIB PASSES QD\n", argv[0]);
		return 2;
	}
	const char *target = argv[1], *mode = argv[2];
	int mixing = !strcmp(mode, "mix");
	int writing = mixing || !strcmp(mode, "write");
	if (!writing && strcmp(mode, "check")) {
		fprintf(stderr, "blkverify: unknown mode %s\n", mode);
		return 2;
	}
	uint64_t seed = strtoull(argv[3], NULL, 0);
	long nblocks = atol(argv[4]);
	uint64_t region_off = (uint64_t)atol(argv[5]) << 20;
	uint64_t region_blocks = ((uint64_t)atol(argv[6]) << 20) / BS;
	long passes = atol(argv[7]), qd = atol(argv[8]);
	if (nblocks < 1 || (uint64_t)nblocks > region_blocks || passes < 0 || qd < 1 || qd > 256) {
		fprintf(stderr, "blkverify: bad block count, passes or queue depth\n");
		return 2;
	}
	int fd = open(target, (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0 && errno == EINVAL)
		fd = open(target, writing ? O_RDWR : O_RDONLY);
	if (fd < 0) {
		perror("blkverify: open");
		return 1;
	}
	/* Distinct blocks: k -> (a * k + b) mod region_blocks, a odd and the region a
	 * power of two of blocks, so the map is a bijection. */
	if (region_blocks & (region_blocks - 1)) {
		fprintf(stderr, "blkverify: the region must be a power of two of 4 KiB blocks\n");
		return 2;
	}
	uint64_t a = (mix(seed) | 1), b = mix(seed + 1);
	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, qd, &ctx) < 0) {
		perror("blkverify: io_setup");
		return 1;
	}
	struct iocb *cbs = calloc(qd, sizeof(*cbs));
	struct iocb **ptrs = calloc(qd, sizeof(*ptrs));
	struct io_event *events = calloc(qd, sizeof(*events));
	unsigned char **bufs = calloc(qd, sizeof(*bufs));
	long *which = calloc(qd, sizeof(*which));
	char *reading = calloc(qd, 1);
	/* The blocks whose write has completed: what a mixed read may choose. */
	long *written = calloc(nblocks, sizeof(*written)), nwritten = 0;
	unsigned long long ops = 0;
	unsigned char *expect = malloc(BS);
	if (!cbs || !ptrs || !events || !bufs || !which || !reading || !written || !expect)
		return 1;
	for (long i = 0; i < qd; i++)
		if (posix_memalign((void **)&bufs[i], 4096, BS))
			return 1;
	long errors = 0, mismatches = 0;
	unsigned long long ios = 0;
	double start = now();
	for (long pass = writing ? -1 : 0; pass < passes; pass++) {
		int wr = pass < 0;
		long next = 0, inflight = 0;
		char *busy = calloc(qd, 1);
		for (;;) {
			long n = 0;
			for (long i = 0; i < qd && next < nblocks; i++) {
				if (busy[i])
					continue;
				int rd = !wr || (mixing && (ops++ & 1) && nwritten > 0);
				uint64_t blk;
				if (wr && rd)
					blk = (uint64_t)written[mix(seed ^ ops) % (uint64_t)nwritten];
				else
					blk = (a * (uint64_t)next++ + b) & (region_blocks - 1);
				memset(&cbs[i], 0, sizeof(cbs[i]));
				cbs[i].aio_fildes = fd;
				cbs[i].aio_lio_opcode = rd ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
				cbs[i].aio_buf = (uintptr_t)bufs[i];
				cbs[i].aio_nbytes = BS;
				cbs[i].aio_offset = region_off + blk * BS;
				cbs[i].aio_data = i;
				which[i] = (long)blk;
				reading[i] = rd;
				if (!rd)
					pattern(seed, blk, bufs[i]);
				busy[i] = 1;
				ptrs[n++] = &cbs[i];
			}
			if (aio_submit_all(ctx, ptrs, n, "blkverify"))
				return 1;
			inflight += n;
			if (!inflight)
				break;
			long got = aio_reap(ctx, events, qd, "blkverify");
			if (got < 0)
				return 1;
			for (long e = 0; e < got; e++) {
				long i = (long)events[e].data;
				if (events[e].res != BS) {
					if (errors < 5)
						fprintf(stderr, "blkverify: %s of block %ld returned %lld\n",
							reading[i] ? "read" : "write", which[i], (long long)events[e].res);
					errors++;
				} else if (!reading[i]) {
					written[nwritten++] = which[i];
				} else {
					pattern(seed, which[i], expect);
					if (memcmp(expect, bufs[i], BS)) {
						if (mismatches < 5)
							fprintf(stderr, "blkverify: block %ld differs (pass %ld)\n", which[i], pass);
						mismatches++;
					}
				}
				busy[i] = 0;
				inflight--;
				ios++;
			}
		}
		free(busy);
		if (wr && fdatasync(fd) < 0 && errno != EINVAL) {
			perror("blkverify: fdatasync");
			errors++;
		}
	}
	printf("blkverify mode=%s blocks=%ld passes=%ld ios=%llu errors=%ld mismatches=%ld secs=%.1f\n",
	       mode, nblocks, passes, ios, errors, mismatches, now() - start);
	syscall(SYS_io_destroy, ctx);
	close(fd);
	return errors || mismatches ? 1 : 0;
}
