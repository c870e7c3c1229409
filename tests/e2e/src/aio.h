/*
 * Linux native AIO as raw system calls (no libaio in the guest), shared by
 * blkbench and blkverify.
 */
#ifndef E2E_AIO_H
#define E2E_AIO_H

#include <errno.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Submits all n iocbs, retrying what the kernel did not take; -1 on error. */
static int aio_submit_all(aio_context_t ctx, struct iocb **ptrs, long n, const char *who)
{
	for (long done = 0; done < n;) {
		long r = syscall(SYS_io_submit, ctx, n - done, ptrs + done);
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			fprintf(stderr, "%s: io_submit: %m\n", who);
			return -1;
		}
		done += r;
	}
	return 0;
}

/* Waits for at least one of up to max completions; their count, or -1 on error. */
static long aio_reap(aio_context_t ctx, struct io_event *events, long max, const char *who)
{
	for (;;) {
		long got = syscall(SYS_io_getevents, ctx, 1, max, events, NULL);
		if (got >= 0)
			return got;
		if (errno != EINTR) {
			fprintf(stderr, "%s: io_getevents: %m\n", who);
			return -1;
		}
	}
}

#endif
