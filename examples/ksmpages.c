/*
 * ksmpages: Andrea Arcangeli's worst case for KSM (2009), rewritten for
 * cuse-ksm from its description; no original code.
 *
 * A large buffer (default 1 GiB) whose pages are all equal except for the
 * last 8 bytes, which hold the page's index: every comparison in the
 * content-sorted trees runs to the end of the page before it finds the
 * difference, and nothing ever merges.  The buffer is registered through
 * /dev/ksm, the scanner started, and the time of each full scan is measured
 * from the control files (full_scans).  With -m the tails are then cleared,
 * making every page identical, and the time until all are merged is reported.
 *
 *   ksmpages [-s MIB] [-n SCANS] [-p PAGES_TO_SCAN] [-t SLEEP_US] [-m] [-T TIMEOUT]
 *
 *   -s  buffer size in MiB (default 1024)
 *   -n  full scans to time (default 3)
 *   -p  pages per scanner round (default 4096)   -t  sleep between rounds, us (default 0)
 *   -m  then make the pages identical and time the merge
 *   -T  give up after this many seconds per phase (default 3600)
 *
 * Control files: $CUSE_KSM_STATS_DIR or /run/cuse-ksm/ksm.  The scanner's
 * previous settings are put back at exit.  Exit status 0 when every phase
 * finished (and, with -m, pages_shared 1 and pages_sharing N-1 were seen).
 */
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

#define PAGE 4096UL

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long stat_value(const char *name)
{
	const char *dir = getenv("CUSE_KSM_STATS_DIR") ? getenv("CUSE_KSM_STATS_DIR") : "/run/cuse-ksm/ksm";
	char path[512], buf[64];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
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

/* Wait until full_scans exceeds `after`; returns the new value, -1 on time-out. */
static long next_scan(long after, double timeout)
{
	double end = now() + timeout;
	long v;

	while ((v = stat_value("full_scans")) <= after) {
		if (v < 0 || now() > end)
			return -1;
		usleep(v < 0 ? 100000 : 2000);
	}
	return v;
}

int main(int argc, char **argv)
{
	const char *dev = getenv("KSM_DEVICE") ? getenv("KSM_DEVICE") : "/dev/ksm";
	unsigned long mib = 1024, scans = 3, to_scan = 4096, sleep_us = 0, npages, i;
	double timeout = 3600, t0, t, total = 0;
	struct ksm_kthread_info saved, run;
	struct ksm_memory_region region;
	int opt, merge = 0, fd, sma, rc = 0;
	long fs;
	char *buf;

	while ((opt = getopt(argc, argv, "s:n:p:t:mT:")) != -1) {
		switch (opt) {
		case 's': mib = strtoul(optarg, NULL, 0); break;
		case 'n': scans = strtoul(optarg, NULL, 0); break;
		case 'p': to_scan = strtoul(optarg, NULL, 0); break;
		case 't': sleep_us = strtoul(optarg, NULL, 0); break;
		case 'm': merge = 1; break;
		case 'T': timeout = atof(optarg); break;
		default:
			fprintf(stderr, "usage: ksmpages [-s MIB] [-n SCANS] [-p PAGES_TO_SCAN] [-t SLEEP_US] [-m] [-T TIMEOUT]\n");
			return 2;
		}
	}
	if (!mib || !to_scan) {
		fprintf(stderr, "ksmpages: -s and -p must be > 0\n");
		return 2;
	}
	npages = mib * (1024 * 1024 / PAGE);
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	t0 = now();
	for (i = 0; i < npages; i++) {
		uint64_t idx = i;

		memset(buf + i * PAGE, 0x42, PAGE - 8);
		memcpy(buf + (i + 1) * PAGE - 8, &idx, 8);
	}
	printf("ksmpages: %lu MiB, %lu pages, equal but for the index in the last 8 bytes (filled in %.2f s)\n", mib,
	       npages, now() - t0);

	fd = open(dev, O_RDWR);
	if (fd < 0) {
		perror(dev);
		return 1;
	}
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	if (sma < 0) {
		perror("KSM_CREATE_SHARED_MEMORY_AREA");
		return 1;
	}
	region = (struct ksm_memory_region){.npages = (__u32)npages, .addr = (uintptr_t)buf};
	if (ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) < 0) {
		perror("KSM_REGISTER_MEMORY_REGION");
		return 1;
	}
	memset(&saved, 0, sizeof(saved));
	ioctl(fd, KSM_GET_INFO_KTHREAD, &saved);
	run = (struct ksm_kthread_info){.sleep = (__u32)sleep_us, .pages_to_scan = (__u32)to_scan,
					.flags = ksm_control_flags_run};
	fs = stat_value("full_scans");
	if (fs < 0) {
		fprintf(stderr, "ksmpages: cannot read the control files (full_scans)\n");
		return 1;
	}
	if (ioctl(fd, KSM_START_STOP_KTHREAD, &run) != 0) {
		perror("KSM_START_STOP_KTHREAD");
		return 1;
	}
	printf("ksmpages: scanner started: %lu pages per round, sleep %lu us\n", to_scan, sleep_us);
	fflush(stdout);

	/* The pass that was under way when we registered does not count. */
	fs = next_scan(fs, timeout);
	for (i = 1; fs >= 0 && i <= scans; i++) {
		t0 = now();
		fs = next_scan(fs, timeout);
		if (fs < 0)
			break;
		t = now() - t0;
		total += t;
		printf("full scan %lu: %.3f s, %.1f MiB/s (pages_shared %ld, pages_unshared %ld, pages_volatile %ld)\n",
		       i, t, mib / t, stat_value("pages_shared"), stat_value("pages_unshared"),
		       stat_value("pages_volatile"));
		fflush(stdout);
	}
	if (fs < 0) {
		fprintf(stderr, "ksmpages: no full scan within %.0f s\n", timeout);
		rc = 1;
	} else {
		printf("ksmpages: mean full scan of %lu MiB: %.3f s\n", mib, total / scans);
	}

	if (merge && !rc) {
		long want = (long)npages - 1;

		for (i = 0; i < npages; i++)
			memset(buf + (i + 1) * PAGE - 8, 0x42, 8);
		t0 = now();
		while (!(stat_value("pages_shared") == 1 && stat_value("pages_sharing") == want)) {
			if (now() - t0 > timeout) {
				fprintf(stderr, "ksmpages: not merged within %.0f s (pages_shared %ld, pages_sharing %ld)\n",
					timeout, stat_value("pages_shared"), stat_value("pages_sharing"));
				rc = 1;
				break;
			}
			usleep(5000);
		}
		if (!rc)
			printf("ksmpages: tails cleared; %lu MiB merged in %.3f s: pages_shared 1, pages_sharing %ld\n", mib,
			       now() - t0, want);
	}
	fflush(stdout);
	saved.flags &= ksm_control_flags_run;
	if (saved.flags && !saved.pages_to_scan)
		saved.flags = 0;
	ioctl(fd, KSM_START_STOP_KTHREAD, &saved);
	close(sma);
	close(fd);
	return rc;
}
