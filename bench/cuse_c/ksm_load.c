/*
 * Load client for /dev/ksm-like devices: P processes hammer ioctls for T
 * seconds, each call timed; prints throughput and the latency distribution.
 *
 *   ksm_load [-p PROCS] [-t SECONDS] [-m api|info|soak] [-s SMAS] [-r REGIONS]
 *            [-n PAGES] [-S PAGES_TO_SCAN:SLEEP_US] DEVICE
 *
 * api   KSM_GET_API_VERSION only (one round trip to the server).
 * info  KSM_GET_INFO_KTHREAD only (the RETRY dance: two round trips).
 * soak  every process first creates SMAS SMAs with REGIONS regions of PAGES
 *       pages each (pages with duplicate content across processes), then
 *       mixes GET_API_VERSION, GET_INFO_KTHREAD, REMOVE + REGISTER again of
 *       one SMA, writes into its pages (COW churn), and now and then closes
 *       an SMA and creates a new one (the ptrace fd hand-out).
 * -S    START_STOP_KTHREAD with flags 1 before the run (the scanner runs
 *       during it), flags 0 after.
 *
 * Every result is checked; any unexpected one counts as an error and the
 * first few are printed.  Last line, for scripts:
 *   RESULT mode=... procs=... seconds=... ops=... errors=... ops_per_s=...
 *          p50_us=... p90_us=... p99_us=... max_us=...
 * Exit status: 0 if no error, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/ksm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define BUCKETS (1000 * 1000) /* 1 us each, up to 1 s; the last one is "more" */
#define MAX_SMAS 16
#define MAX_REGIONS 16

struct shared {
	double start, deadline;
	uint64_t ops, errors, printed, ready;
	uint64_t hist[BUCKETS];
};

static struct shared *sh;
static const char *device;
static int seconds = 10, smas = 3, regions = 2, pages = 16;
static const char *mode = "api";

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void error(const char *what, long got, int err)
{
	__atomic_fetch_add(&sh->errors, 1, __ATOMIC_RELAXED);
	if (__atomic_fetch_add(&sh->printed, 1, __ATOMIC_RELAXED) < 10)
		fprintf(stderr, "ksm_load: pid %d: %s returned %ld (errno %d %s)\n", getpid(), what, got, err,
			strerror(err));
}

static void record(double t0)
{
	long us = (long)((now() - t0) * 1e6);
	if (us >= BUCKETS)
		us = BUCKETS - 1;
	__atomic_fetch_add(&sh->hist[us], 1, __ATOMIC_RELAXED);
	__atomic_fetch_add(&sh->ops, 1, __ATOMIC_RELAXED);
}

/* One timed ioctl; returns its result (errno preserved). */
static long timed(int fd, unsigned long cmd, void *arg)
{
	double t0 = now();
	long r = ioctl(fd, cmd, arg);
	int err = errno;
	record(t0);
	errno = err;
	return r;
}

struct sma {
	int fd;
	struct ksm_memory_region region[MAX_REGIONS];
	char *mem;
};

static int create_sma(int dev, struct sma *s, unsigned seed)
{
	s->fd = (int)timed(dev, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	if (s->fd < 0) {
		error("KSM_CREATE_SHARED_MEMORY_AREA", s->fd, errno);
		return -1;
	}
	for (int r = 0; r < regions; r++) {
		long got = timed(s->fd, KSM_REGISTER_MEMORY_REGION, &s->region[r]);
		if (got != 0)
			error("KSM_REGISTER_MEMORY_REGION", got, errno);
	}
	(void)seed;
	return 0;
}

static void worker(int go)
{
	int dev = open(device, O_RDWR);
	struct sma sma[MAX_SMAS];
	struct ksm_kthread_info info;
	unsigned seed = (unsigned)getpid();
	char c;

	if (dev < 0) {
		error("open", dev, errno);
		_exit(1);
	}
	if (!strcmp(mode, "soak")) {
		for (int s = 0; s < smas; s++) {
			size_t len = (size_t)regions * pages * PAGE;
			sma[s].mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (sma[s].mem == MAP_FAILED)
				_exit(2);
			for (size_t p = 0; p < len / PAGE; p++)
				memset(sma[s].mem + p * PAGE, (int)(p % 4) + 1, PAGE); /* duplicates everywhere */
			for (int r = 0; r < regions; r++) {
				memset(&sma[s].region[r], 0, sizeof(sma[s].region[r]));
				sma[s].region[r].npages = (unsigned)pages;
				sma[s].region[r].addr = (uintptr_t)(sma[s].mem + (size_t)r * pages * PAGE);
			}
			if (create_sma(dev, &sma[s], seed) < 0)
				_exit(1);
		}
	}
	__atomic_fetch_add(&sh->ready, 1, __ATOMIC_SEQ_CST);
	if (read(go, &c, 1) < 0) /* wait for everybody: EOF when the parent closes it */
		_exit(2);
	while (now() < sh->deadline) {
		unsigned pick = (unsigned)rand_r(&seed);
		long got;
		if (!strcmp(mode, "api") || (!strcmp(mode, "soak") && pick % 4 == 0)) {
			got = timed(dev, KSM_GET_API_VERSION, 0);
			if (got != KSM_API_VERSION)
				error("KSM_GET_API_VERSION", got, errno);
		} else if (!strcmp(mode, "info") || pick % 4 == 1) {
			got = timed(dev, KSM_GET_INFO_KTHREAD, &info);
			if (got != 0)
				error("KSM_GET_INFO_KTHREAD", got, errno);
		} else if (pick % 4 == 2) {
			struct sma *s = &sma[(pick >> 8) % smas];
			got = timed(s->fd, KSM_REMOVE_MEMORY_REGION, 0);
			if (got != 0)
				error("KSM_REMOVE_MEMORY_REGION", got, errno);
			for (int r = 0; r < regions; r++) {
				got = timed(s->fd, KSM_REGISTER_MEMORY_REGION, &s->region[r]);
				if (got != 0)
					error("KSM_REGISTER_MEMORY_REGION", got, errno);
			}
		} else if ((pick >> 8) % 64 == 0) {
			/* Close one SMA and create a new one: a hand-out under load. */
			struct sma *s = &sma[(pick >> 16) % smas];
			close(s->fd);
			create_sma(dev, s, seed);
		} else {
			/* Write a page: it stops equalling its shared page (COW churn). */
			struct sma *s = &sma[(pick >> 8) % smas];
			size_t p = (pick >> 16) % ((size_t)regions * pages);
			s->mem[p * PAGE + (pick & 0xff)] ^= 1;
		}
	}
	if (!strcmp(mode, "soak"))
		for (int s = 0; s < smas; s++)
			close(sma[s].fd);
	close(dev);
	_exit(0);
}

static double percentile(uint64_t total, double q)
{
	uint64_t want = (uint64_t)(q * (double)total), seen = 0;
	for (long i = 0; i < BUCKETS; i++) {
		seen += sh->hist[i];
		if (seen > want)
			return (double)i + 0.5;
	}
	return BUCKETS;
}

static int kthread(unsigned pages_to_scan, unsigned sleep, unsigned flags)
{
	struct ksm_kthread_info k = {.sleep = sleep, .pages_to_scan = pages_to_scan, .flags = flags};
	int fd = open(device, O_RDWR);
	long r = fd < 0 ? -1 : ioctl(fd, KSM_START_STOP_KTHREAD, &k);
	if (fd >= 0)
		close(fd);
	return r == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
	int procs = 1, opt, go[2], status, failed = 0;
	unsigned scan_pages = 0, scan_sleep = 0;
	pid_t *pids;

	while ((opt = getopt(argc, argv, "p:t:m:s:r:n:S:")) != -1) {
		switch (opt) {
		case 'p': procs = atoi(optarg); break;
		case 't': seconds = atoi(optarg); break;
		case 'm': mode = optarg; break;
		case 's': smas = atoi(optarg); break;
		case 'r': regions = atoi(optarg); break;
		case 'n': pages = atoi(optarg); break;
		case 'S':
			if (sscanf(optarg, "%u:%u", &scan_pages, &scan_sleep) != 2)
				return 2;
			break;
		default: return 2;
		}
	}
	if (optind != argc - 1 || procs < 1 || smas < 1 || smas > MAX_SMAS || regions < 1 || regions > MAX_REGIONS ||
	    (strcmp(mode, "api") && strcmp(mode, "info") && strcmp(mode, "soak"))) {
		fprintf(stderr, "usage: ksm_load [-p PROCS] [-t SECONDS] [-m api|info|soak] [-s SMAS] [-r REGIONS] "
				"[-n PAGES] [-S PAGES:SLEEP_US] DEVICE\n");
		return 2;
	}
	device = argv[optind];
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pids = calloc((size_t)procs, sizeof(*pids));
	if (sh == MAP_FAILED || !pids || pipe(go) < 0)
		return 2;
	sh->deadline = 1e300;
	if (scan_pages && kthread(scan_pages, scan_sleep, ksm_control_flags_run) < 0) {
		fprintf(stderr, "ksm_load: START_STOP_KTHREAD failed\n");
		return 1;
	}
	for (int i = 0; i < procs; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			return 2;
		if (pids[i] == 0) {
			close(go[1]);
			worker(go[0]);
		}
	}
	close(go[0]);
	/* Wait until every worker has finished its set-up (not measured). */
	while (__atomic_load_n(&sh->ready, __ATOMIC_SEQ_CST) < (uint64_t)procs) {
		if (waitpid(-1, &status, WNOHANG) > 0) {
			fprintf(stderr, "ksm_load: a worker died during set-up\n");
			for (int i = 0; i < procs; i++)
				kill(pids[i], SIGKILL);
			return 1;
		}
		usleep(10000);
	}
	/* Set-up ops (creations) are not part of the measured window.  Clear
	 * first, then start the clock: under software emulation clearing the
	 * histogram can take longer than a short window. */
	__atomic_store_n(&sh->ops, 0, __ATOMIC_SEQ_CST);
	memset(sh->hist, 0, sizeof(sh->hist));
	sh->start = now();
	sh->deadline = sh->start + seconds;
	close(go[1]);
	for (int i = 0; i < procs; i++) {
		if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			failed++;
	}
	double elapsed = now() - sh->start;
	if (scan_pages)
		kthread(0, 0, 0);
	uint64_t total = 0;
	double max = 0;
	for (long i = 0; i < BUCKETS; i++) {
		total += sh->hist[i];
		if (sh->hist[i])
			max = (double)i + 0.5;
	}
	if (failed)
		fprintf(stderr, "ksm_load: %d worker(s) failed\n", failed);
	printf("RESULT mode=%s procs=%d seconds=%.2f ops=%llu errors=%llu ops_per_s=%.0f p50_us=%.0f p90_us=%.0f "
	       "p99_us=%.0f max_us=%.0f\n",
	       mode, procs, elapsed, (unsigned long long)total, (unsigned long long)sh->errors, total / elapsed,
	       percentile(total, 0.5), percentile(total, 0.9), percentile(total, 0.99), max);
	return sh->errors || failed ? 1 : 0;
}
