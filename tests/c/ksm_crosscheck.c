/*
 * The workload of tests/integration/test_crosscheck.py: the same memory
 * pattern, handed either to the emulator (/dev/ksm) or to the running
 * kernel's own KSM (madvise(MADV_MERGEABLE)), so that the test can compare
 * their pages_shared and pages_sharing.
 *
 *   ksm_crosscheck ksm|madvise PATTERN NPAGES
 *
 * PATTERN (page i of NPAGES; every page is written, so present):
 *   equal     all pages identical
 *   half      even pages are copies of one of 4 contents, odd pages unique
 *   volatile  3 of 4 pages identical; every 4th page is rewritten by a
 *             writer thread every 2 ms (a counter), never stable
 *   tail      all equal but for the index in the last 8 bytes (ksmpages):
 *             all unique
 *   tailgroup the last 8 bytes hold i / 8: groups of 8 identical pages that
 *             differ from the other groups only in their last 8 bytes
 *   zeroread  even pages identical (written); odd pages only read, so they
 *             map the kernel's shared zero page (present in pagemap, but not
 *             anonymous memory of their own)
 *
 * Transparent huge pages are refused (MADV_NOHUGEPAGE) in both modes, so
 * the kernel scans small pages as the emulator does.  Prints
 * "ready PID ADDR" once registered, then waits for end of file on stdin;
 * in ksm mode the SMA is closed on the way out (which drops the region).
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static char *mem;
static unsigned long npages;
static volatile int stop;

static void *writer(void *arg)
{
	uint64_t counter = 0;

	(void)arg;
	while (!stop) {
		counter++;
		for (unsigned long i = 3; i < npages; i += 4)
			memcpy(mem + i * PAGE + 8, &counter, sizeof(counter));
		usleep(2000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int madv, sma = -1, fd = -1;
	pthread_t thread;
	const char *pattern;
	char buf[64];

	if (argc != 4 || (strcmp(argv[1], "ksm") && strcmp(argv[1], "madvise"))) {
		fprintf(stderr, "usage: ksm_crosscheck ksm|madvise equal|half|volatile|tail|tailgroup|zeroread NPAGES\n");
		return 2;
	}
	madv = !strcmp(argv[1], "madvise");
	pattern = argv[2];
	npages = strtoul(argv[3], NULL, 0);
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!npages || mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	madvise(mem, npages * PAGE, MADV_NOHUGEPAGE); /* may fail without THP: harmless */
	for (uint64_t i = 0; i < npages; i++) {
		char *p = mem + i * PAGE;
		uint64_t tail;

		if (!strcmp(pattern, "zeroread") && i % 2) {
			if (*(volatile char *)p) /* a read fault: the zero page */
				return 1;
			continue;
		}
		memset(p, 0x6b, PAGE);
		if (!strcmp(pattern, "equal") || !strcmp(pattern, "zeroread")) {
			continue;
		} else if (!strcmp(pattern, "half")) {
			uint64_t v = i % 2 ? 1000 + i : (i / 2) % 4;

			memcpy(p, &v, sizeof(v));
		} else if (!strcmp(pattern, "volatile")) {
			if (i % 4 == 3)
				memcpy(p, &i, sizeof(i)); /* unique; the writer changes bytes 8-15 */
		} else if (!strcmp(pattern, "tail")) {
			memcpy(p + PAGE - 8, &i, sizeof(i));
		} else if (!strcmp(pattern, "tailgroup")) {
			tail = i / 8;
			memcpy(p + PAGE - 8, &tail, sizeof(tail));
		} else {
			fprintf(stderr, "ksm_crosscheck: unknown pattern %s\n", pattern);
			return 2;
		}
	}
	if (!strcmp(pattern, "volatile") && pthread_create(&thread, NULL, writer, NULL)) {
		perror("pthread_create");
		return 1;
	}

	if (madv) {
		if (madvise(mem, npages * PAGE, MADV_MERGEABLE)) {
			perror("madvise(MADV_MERGEABLE)");
			return 1;
		}
	} else {
		struct ksm_memory_region r = {.npages = (__u32)npages, .addr = (uintptr_t)mem};

		fd = open(getenv("CUSE_KSM_DEVICE") ? getenv("CUSE_KSM_DEVICE") : "/dev/ksm", O_RDWR);
		sma = fd >= 0 ? ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0) : -1;
		if (sma < 0 || ioctl(sma, KSM_REGISTER_MEMORY_REGION, &r)) {
			perror("/dev/ksm");
			return 1;
		}
	}
	printf("ready %d %p\n", (int)getpid(), (void *)mem);
	fflush(stdout);
	while (read(0, buf, sizeof(buf)) > 0)
		;
	stop = 1;
	if (!strcmp(pattern, "volatile"))
		pthread_join(thread, NULL);
	if (sma >= 0)
		close(sma);
	if (fd >= 0)
		close(fd);
	return 0;
}
