/*
 * Several threads create SMAs at the same moment: each must get its own,
 * distinct, working fd (the hand-out touches only the calling thread).
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "check.h"

#define NTHREADS 8
#define NPAGES 4

static int dev_fd;
static pthread_barrier_t barrier;

struct result {
	int sma;
	int create_errno;
	int register_result;
	long canary;
};

static void *worker(void *arg)
{
	struct result *res = arg;
	static __thread char buf[NPAGES * 4096] __attribute__((aligned(4096)));
	volatile long canary = 0x1234567890abcdefL; /* on this thread's stack, across the hand-out */
	struct ksm_memory_region region = {.npages = NPAGES, .addr = (uintptr_t)buf};

	pthread_barrier_wait(&barrier);
	errno = 0;
	res->sma = ioctl(dev_fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	res->create_errno = errno;
	res->canary = canary;
	res->register_result = res->sma >= 0 ? ioctl(res->sma, KSM_REGISTER_MEMORY_REGION, &region) : -1;
	return NULL;
}

int main(void)
{
	pthread_t threads[NTHREADS];
	struct result results[NTHREADS];
	int i, j, distinct = 1;

	dev_fd = open("/dev/ksm", O_RDWR);
	CHECK(dev_fd >= 0, "open /dev/ksm");
	pthread_barrier_init(&barrier, NULL, NTHREADS);
	for (i = 0; i < NTHREADS; i++)
		pthread_create(&threads[i], NULL, worker, &results[i]);
	for (i = 0; i < NTHREADS; i++)
		pthread_join(threads[i], NULL);

	for (i = 0; i < NTHREADS; i++) {
		CHECK(results[i].sma >= 0 && results[i].sma != dev_fd,
		      "thread %d got SMA fd %d (errno %d)", i, results[i].sma, results[i].create_errno);
		CHECK(results[i].register_result == 0, "thread %d registered through its SMA", i);
		CHECK(results[i].canary == 0x1234567890abcdefL, "thread %d stack intact across the hand-out", i);
		for (j = 0; j < i; j++)
			if (results[i].sma == results[j].sma)
				distinct = 0;
	}
	CHECK(distinct, "all %d SMA fds are distinct", NTHREADS);
	for (i = 0; i < NTHREADS; i++)
		if (results[i].sma >= 0)
			CHECK(ioctl(results[i].sma, KSM_REMOVE_MEMORY_REGION, 0) == 0 && close(results[i].sma) == 0,
			      "thread %d's SMA removed and closed", i);
	close(dev_fd);
	CHECK_DONE();
}
