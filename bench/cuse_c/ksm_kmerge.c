/*
 * The front-end cost of real merging (--merge kernel), as a 2009 program
 * sees it: the same workload merged by the host kernel's KSM, registered
 * either through /dev/ksm or by madvise() directly.
 *
 *   ksm_kmerge dev     [options]   CREATE_SHARED_MEMORY_AREA, REGISTER, START_STOP
 *   ksm_kmerge madvise [options]   madvise(MADV_MERGEABLE), then /sys/kernel/mm/ksm
 *   ksm_kmerge register [-n REGIONS] [-r PAGES] [-d DEVICE]
 *
 * dev and madvise map MIB MiB of private anonymous memory and fill it with
 * the dup50 workload of bench/workload.py: page i, for even i, holds
 * duplicate content number (i/2) mod 1024; odd pages are unique (random,
 * with the page's index in their first word).  The clock starts before the
 * first call of the registration (open("/dev/ksm"), or madvise()), and stops
 * when the process's /proc/self/ksm_merging_pages (-w kernel, the default)
 * or the daemon's processes/PID/ksm_merging_pages under -e DIR (-w
 * emulated: the emulated scanner's count) reaches the full merge, computed
 * from the workload: every even page whose content appears twice or more.
 * The process polls every 1 ms, but every 20 ms with -w emulated: each of
 * those reads is a FUSE request that the daemon's one loop must answer.
 * Then the scanner is stopped (START_STOP with flags 0, or run=0).
 *
 *   -M MIB          workload size (default 64)
 *   -p PAGES -s US  pages_to_scan and sleep in microseconds (default 100000, 0);
 *                   madvise writes sleep_millisecs = US rounded up to ms, as
 *                   the daemon does
 *   -t SECONDS      give up when the merge is not complete by then (default 600)
 *   -D PID -K PID   report the CPU time (utime + stime) of the daemon and of
 *                   ksmd over the timed interval
 *   -e DIR          the daemon's control files: also report its emulated count
 *
 * register times each of REGIONS (default 500) KSM_REGISTER_MEMORY_REGION
 * calls of PAGES (default 4) pages each, consecutive pieces of one touched
 * private mapping, on one SMA, with clock_gettime around each ioctl.
 *
 * Last line, for scripts:
 *   RESULT bench=merge via=dev|madvise wait=... mib=... pages=... expected=...
 *          merged=... setup_ms=... merge_s=... daemon_cpu_s=... ksmd_cpu_s=...
 *          emulated=...
 *   RESULT bench=register regions=... pages=... create_us=... p50_us=...
 *          p99_us=... max_us=... mean_us=...
 * Exit status: 0, or 1 on any failed call or a merge that never completed
 * (then no RESULT line).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define CONTENTS 1024
#define KSM "/sys/kernel/mm/ksm"

static const char *device = "/dev/ksm";
static const char *stats_dir;
static unsigned mib = 64, pages_to_scan = 100000, sleep_us, timeout_s = 600;
static unsigned regions = 500, region_pages = 4;
static int daemon_pid, ksmd_pid, wait_emulated;

static void die(const char *what)
{
	fprintf(stderr, "ksm_kmerge: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A number file (/proc, /sys, the control files); -1 if it cannot be read. */
static long read_number(const char *path)
{
	char buf[64];
	long n = -1;
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t got = read(fd, buf, sizeof(buf) - 1);
	if (got > 0) {
		buf[got] = 0;
		n = strtol(buf, NULL, 10);
	}
	close(fd);
	return n;
}

static void write_number(const char *name, unsigned long value)
{
	char path[128], buf[32];
	snprintf(path, sizeof(path), KSM "/%s", name);
	int fd = open(path, O_WRONLY);
	int len = snprintf(buf, sizeof(buf), "%lu\n", value);
	if (fd < 0 || write(fd, buf, len) != len)
		die(path);
	close(fd);
}

/* utime + stime of a process, in seconds; 0 without a pid. */
static double cpu_s(int pid)
{
	char path[64], buf[1024];
	unsigned long utime, stime;
	if (!pid)
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die(path);
	ssize_t got = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (got <= 0)
		die(path);
	buf[got] = 0;
	/* After "pid (comm)": state is field 3, utime and stime fields 14 and 15. */
	char *p = strrchr(buf, ')');
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2) {
		errno = EINVAL;
		die(path);
	}
	return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* dup50; returns the pages a full merge maps to a shared page. */
static uint64_t fill(uint64_t *mem, uint64_t npages)
{
	uint64_t seed = (uint64_t)now() * 0x9e3779b97f4a7c15ull | 1, count[CONTENTS] = {0}, merged = 0;
	for (uint64_t i = 0; i < npages; i++) {
		uint64_t *w = mem + i * WORDS;
		if (i % 2 == 0) {
			uint64_t c = i / 2 % CONTENTS, s = (c + 1) * 0x9e3779b97f4a7c15ull;
			count[c]++;
			w[0] = 0xd0d0000000000000ull | c;
			for (int j = 1; j < WORDS; j++)
				w[j] = xorshift(&s);
		} else {
			w[0] = 0x0dd0000000000000ull | i;
			for (int j = 1; j < WORDS; j++)
				w[j] = xorshift(&seed);
		}
	}
	for (int c = 0; c < CONTENTS; c++)
		merged += count[c] >= 2 ? count[c] : 0;
	return merged;
}

static long merged_now(void)
{
	char path[256];
	if (!wait_emulated)
		return read_number("/proc/self/ksm_merging_pages");
	snprintf(path, sizeof(path), "%s/processes/%d/ksm_merging_pages", stats_dir, getpid());
	return read_number(path);
}

static int merge(int via_dev)
{
	uint64_t npages = (uint64_t)mib * 1024 * 1024 / PAGE;
	size_t len = npages * PAGE;
	struct ksm_kthread_info info = {.sleep = sleep_us, .pages_to_scan = pages_to_scan,
					.flags = ksm_control_flags_run};
	int fd = -1, sma = -1;

	uint64_t *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	uint64_t expected = fill(mem, npages);

	double cpu0 = cpu_s(daemon_pid), ksmd0 = cpu_s(ksmd_pid);
	double t0 = now();
	if (via_dev) {
		struct ksm_memory_region region = {.npages = npages, .addr = (uintptr_t)mem};
		if ((fd = open(device, O_RDWR)) < 0)
			die(device);
		if ((sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0)) < 0)
			die("KSM_CREATE_SHARED_MEMORY_AREA");
		if (ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) != 0)
			die("KSM_REGISTER_MEMORY_REGION");
		if (ioctl(fd, KSM_START_STOP_KTHREAD, &info) != 0)
			die("KSM_START_STOP_KTHREAD");
	} else {
		if (madvise(mem, len, MADV_MERGEABLE) != 0)
			die("madvise");
		/* In the order the daemon writes them: the rate before the switch. */
		write_number("sleep_millisecs", (sleep_us + 999) / 1000);
		write_number("pages_to_scan", pages_to_scan);
		write_number("run", 1);
	}
	double t_setup = now();

	long merged;
	while ((merged = merged_now()) != (long)expected) {
		if (now() - t0 > timeout_s) {
			fprintf(stderr, "ksm_kmerge: no full merge within %u s: %ld of %llu pages merged\n", timeout_s,
				merged, (unsigned long long)expected);
			return 1;
		}
		/* The emulated count is a read through the daemon's FUSE mount, */
		/* which its own loop answers: ask seldom, or the asking is the load. */
		usleep(wait_emulated ? 20000 : 1000);
	}
	double t1 = now();
	double cpu1 = cpu_s(daemon_pid), ksmd1 = cpu_s(ksmd_pid);
	long emulated = -1;
	if (stats_dir) {
		char path[256];
		snprintf(path, sizeof(path), "%s/processes/%d/ksm_merging_pages", stats_dir, getpid());
		emulated = read_number(path);
	}

	if (via_dev) {
		info.flags = 0;
		if (ioctl(fd, KSM_START_STOP_KTHREAD, &info) != 0)
			die("KSM_START_STOP_KTHREAD (stop)");
		close(sma);
		close(fd);
	} else {
		write_number("run", 0);
	}
	printf("RESULT bench=merge via=%s wait=%s mib=%u pages=%llu expected=%llu merged=%ld setup_ms=%.1f "
	       "merge_s=%.3f daemon_cpu_s=%.2f ksmd_cpu_s=%.2f emulated=%ld\n",
	       via_dev ? "dev" : "madvise", wait_emulated ? "emulated" : "kernel", mib, (unsigned long long)npages,
	       (unsigned long long)expected, merged, (t_setup - t0) * 1e3, t1 - t0, cpu1 - cpu0, ksmd1 - ksmd0,
	       emulated);
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static int register_latency(void)
{
	size_t len = (size_t)regions * region_pages * PAGE;
	double *us = calloc(regions, sizeof(*us)), sum = 0;
	char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!us || mem == MAP_FAILED)
		die("mmap");
	for (size_t off = 0; off < len; off += PAGE)
		mem[off] = 1; /* present */
	int fd = open(device, O_RDWR);
	if (fd < 0)
		die(device);
	double t0 = now();
	int sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	double create_us = (now() - t0) * 1e6;
	if (sma < 0)
		die("KSM_CREATE_SHARED_MEMORY_AREA");
	for (unsigned k = 0; k < regions; k++) {
		struct ksm_memory_region region = {.npages = region_pages,
						   .addr = (uintptr_t)(mem + (size_t)k * region_pages * PAGE)};
		t0 = now();
		if (ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) != 0) {
			fprintf(stderr, "ksm_kmerge: region %u of %u:\n", k + 1, regions);
			die("KSM_REGISTER_MEMORY_REGION");
		}
		us[k] = (now() - t0) * 1e6;
		sum += us[k];
	}
	qsort(us, regions, sizeof(*us), cmp_double);
	close(sma);
	close(fd);
	printf("RESULT bench=register regions=%u pages=%u create_us=%.0f p50_us=%.0f p99_us=%.0f max_us=%.0f "
	       "mean_us=%.0f\n",
	       regions, region_pages, create_us, us[regions / 2], us[(regions * 99) / 100], us[regions - 1],
	       sum / regions);
	return 0;
}

int main(int argc, char **argv)
{
	const char *what = argc > 1 ? argv[1] : "";
	int opt;
	optind = 2;
	while ((opt = getopt(argc, argv, "M:p:s:t:D:K:e:w:n:r:d:")) != -1) {
		switch (opt) {
		case 'M': mib = strtoul(optarg, NULL, 0); break;
		case 'p': pages_to_scan = strtoul(optarg, NULL, 0); break;
		case 's': sleep_us = strtoul(optarg, NULL, 0); break;
		case 't': timeout_s = strtoul(optarg, NULL, 0); break;
		case 'D': daemon_pid = atoi(optarg); break;
		case 'K': ksmd_pid = atoi(optarg); break;
		case 'e': stats_dir = optarg; break;
		case 'w': wait_emulated = !strcmp(optarg, "emulated"); break;
		case 'n': regions = strtoul(optarg, NULL, 0); break;
		case 'r': region_pages = strtoul(optarg, NULL, 0); break;
		case 'd': device = optarg; break;
		default: return 2;
		}
	}
	if (wait_emulated && !stats_dir) {
		fprintf(stderr, "ksm_kmerge: -w emulated needs -e DIR\n");
		return 2;
	}
	if (!strcmp(what, "dev") || !strcmp(what, "madvise"))
		return merge(!strcmp(what, "dev"));
	if (!strcmp(what, "register") && regions > 0)
		return register_latency();
	fprintf(stderr, "usage: ksm_kmerge dev|madvise|register [options] (see the source)\n");
	return 2;
}
