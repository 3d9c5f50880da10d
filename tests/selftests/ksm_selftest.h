/*
 * Helpers of the ported KSM selftests (tests/selftests): the 2009 /dev/ksm
 * API in place of madvise(MADV_MERGEABLE) and /sys/kernel/mm/ksm/run, and the
 * counters read from the emulator's control files (/run/cuse-ksm/ksm).
 *
 * Written for cuse-ksm; it contains no kernel code.  Output: one
 * "ok - ..." / "not ok - ..." line per check, "# ..." lines for notes and
 * figures, and one summary line: "<name>: PASS (n checks)" or
 * "<name>: FAIL (k of n checks failed)"; the exit status is 1 on failure.
 */
#ifndef KSM_SELFTEST_H
#define KSM_SELFTEST_H

#include <errno.h>
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static const char *st_name = "selftest";
static int st_checks, st_failed;

static inline void st_begin(const char *name)
{
	st_name = name;
	printf("# %s\n", name);
	fflush(stdout);
}

static inline int __attribute__((format(printf, 2, 3))) st_check(int ok, const char *fmt, ...)
{
	va_list ap;

	st_checks++;
	if (!ok)
		st_failed++;
	printf("%s - ", ok ? "ok" : "not ok");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	return ok;
}

static inline void __attribute__((format(printf, 1, 2))) st_note(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static inline int st_done(void)
{
	if (st_failed)
		printf("%s: FAIL (%d of %d checks failed)\n", st_name, st_failed, st_checks);
	else
		printf("%s: PASS (%d checks)\n", st_name, st_checks);
	fflush(stdout);
	return st_failed ? 1 : 0;
}

/* Give up at once (setup failed): what ran so far is reported. */
#define ST_REQUIRE(cond, ...)                                                 \
	do {                                                                  \
		if (!st_check((cond), __VA_ARGS__)) {                         \
			st_note("errno %d (%s); giving up", errno, strerror(errno)); \
			exit(st_done() | 1);                                  \
		}                                                             \
	} while (0)

static inline double st_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The VM is software-emulated: generous limits (seconds), overridable. */
static inline double st_timeout(void)
{
	const char *s = getenv("KSM_SELFTEST_TIMEOUT");

	return s ? atof(s) : 90.0;
}

/* ---- control files --------------------------------------------------------- */

static inline const char *st_stats_dir(void)
{
	const char *d = getenv("CUSE_KSM_STATS_DIR");

	return d ? d : "/run/cuse-ksm/ksm";
}

/* A counter of the control directory; -1 if it cannot be read. */
static inline long st_stat(const char *name)
{
	char path[512], buf[64];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", st_stats_dir(), name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	return strtol(buf, NULL, 10);
}

/* pages of this process that map a shared page (processes/PID/ksm_merging_pages); 0 if not registered */
static inline long st_merging_pages(pid_t pid)
{
	char name[64];
	long v;

	snprintf(name, sizeof(name), "processes/%d/ksm_merging_pages", (int)pid);
	v = st_stat(name);
	return v < 0 ? 0 : v;
}

struct st_counts {
	long shared, sharing;
};

static inline struct st_counts st_counts(void)
{
	struct st_counts c = {st_stat("pages_shared"), st_stat("pages_sharing")};

	return c;
}

/* Wait until full_scans has grown by n from `from`; 0 on time-out. */
static inline int st_wait_scans_from(long from, long n, double timeout)
{
	double end = st_now() + timeout;

	while (st_stat("full_scans") < from + n) {
		if (st_now() > end)
			return 0;
		usleep(20000);
	}
	return 1;
}

static inline int st_wait_scans(long n, double timeout)
{
	return st_wait_scans_from(st_stat("full_scans"), n, timeout);
}

/* Wait until pages_shared/pages_sharing read (shared, sharing); 0 on time-out. */
static inline int st_wait_counts(long shared, long sharing, double timeout)
{
	double end = st_now() + timeout;

	for (;;) {
		struct st_counts c = st_counts();

		if (c.shared == shared && c.sharing == sharing)
			return 1;
		if (st_now() > end)
			return 0;
		usleep(20000);
	}
}

/*
 * Check that pages_shared/pages_sharing reach (shared, sharing) within the
 * timeout; the message gets " pages_shared S, pages_sharing T (got X, Y)".
 */
static inline int __attribute__((format(printf, 4, 5)))
st_check_counts(long shared, long sharing, double timeout, const char *fmt, ...)
{
	int ok = st_wait_counts(shared, sharing, timeout);
	struct st_counts c = st_counts();
	char what[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return st_check(ok, "%s: pages_shared %ld, pages_sharing %ld (got %ld, %ld)", what, shared, sharing, c.shared,
			c.sharing);
}

/*
 * Wait for the counters to settle: unchanged across `scans` full scans
 * (and at least `scans` full scans after the call).  Returns them.
 */
static inline struct st_counts st_settle(long scans, double timeout)
{
	double end = st_now() + timeout;
	struct st_counts last = st_counts();
	long mark = st_stat("full_scans");

	for (;;) {
		struct st_counts c;

		usleep(20000);
		c = st_counts();
		if (c.shared != last.shared || c.sharing != last.sharing) {
			last = c;
			mark = st_stat("full_scans");
		} else if (st_stat("full_scans") >= mark + scans) {
			return c;
		}
		if (st_now() > end)
			return c;
	}
}

/* ---- /dev/ksm --------------------------------------------------------------- */

static inline const char *st_device(void)
{
	const char *d = getenv("CUSE_KSM_DEVICE");

	return d ? d : "/dev/ksm";
}

static inline int st_open(void)
{
	return open(st_device(), O_RDWR);
}

static inline int st_create_sma(int ksm)
{
	return ioctl(ksm, KSM_CREATE_SHARED_MEMORY_AREA, 0);
}

static inline int st_register(int sma, void *addr, unsigned long npages)
{
	struct ksm_memory_region r = {.npages = (__u32)npages, .addr = (uintptr_t)addr};

	return ioctl(sma, KSM_REGISTER_MEMORY_REGION, &r);
}

/* START_STOP_KTHREAD with the run flag (the 2009 equivalent of echo 1 > run). */
static inline int st_start(int ksm, unsigned pages_to_scan, unsigned sleep_us)
{
	struct ksm_kthread_info k = {.sleep = sleep_us, .pages_to_scan = pages_to_scan, .flags = ksm_control_flags_run};

	return ioctl(ksm, KSM_START_STOP_KTHREAD, &k);
}

static inline int st_stop(int ksm)
{
	struct ksm_kthread_info k = {.sleep = 0, .pages_to_scan = 0, .flags = 0};

	return ioctl(ksm, KSM_START_STOP_KTHREAD, &k);
}

/* Anonymous private pages, filled with `c` (written, so present). */
static inline char *st_alloc(unsigned long npages, int c)
{
	char *p = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	memset(p, c, npages * PAGE);
	return p;
}

/* Wait until no process is registered any more and the counters are back to 0 (a previous test's leftovers). */
static inline int st_wait_idle(double timeout)
{
	return st_wait_counts(0, 0, timeout);
}

#endif
