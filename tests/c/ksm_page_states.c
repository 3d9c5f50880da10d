/*
 * Pages in every state `cuse-ksm pages` reports, step by step as the test
 * (tests/integration/test_page_states.py) runs the scanner one full pass
 * at a time.  Region 1, 64 pages registered through the SMA:
 *
 *   0-7    0x11 each: merge into one shared page
 *   8-11   each its own content: stay in the unstable tree
 *   12-13  rewritten before every pass ("tick"): volatile
 *   14-15  0x22 each: merge; "final" then writes 15 (copy on write)
 *   16-17  only read: they map the kernel's zero page
 *   18-19  0x33 each, written by "pair": meet in the unstable tree when
 *          max_kernel_pages allows no new shared page
 *   20     written by "final": seen once by the last pass
 *   21-63  never touched: not present
 *
 * A child registers 16 pages of its own through the inherited SMA fd and
 * waits; "kill-child" makes it exit (its region stays registered: the
 * parent still holds the SMA), so its pages can no longer be read.
 * "register2" registers 32 more pages of the parent, which no pass visits.
 *
 *   ksm_page_states     prints "ready PID ADDR CHILD", then one answer line
 *                       per command read from stdin; exits at end of file.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define PAGE 4096
#define NPAGES 64
#define CHILD_PAGES 16
#define MORE_PAGES 32

static unsigned stamp_no = 1;

/* A content no other page has: a running number at both ends. */
static void stamp(char *page)
{
	memset(page, 0x77, PAGE);
	memcpy(page, &stamp_no, sizeof(stamp_no));
	memcpy(page + PAGE - sizeof(stamp_no), &stamp_no, sizeof(stamp_no));
	stamp_no++;
}

static char *map_pages(unsigned n)
{
	char *mem = mmap(NULL, (size_t)n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return mem;
}

static int region(int sma, char *mem, unsigned n)
{
	struct ksm_memory_region r = {.npages = n, .addr = (uintptr_t)mem};
	return ioctl(sma, KSM_REGISTER_MEMORY_REGION, &r);
}

int main(void)
{
	char line[64], *mem = map_pages(NPAGES);
	volatile char sink;
	int fd, sma, go[2], done[2];
	char byte = 0;
	pid_t child;

	for (int i = 0; i < 8; i++)
		memset(mem + i * PAGE, 0x11, PAGE);
	for (int i = 8; i < 14; i++)
		stamp(mem + i * PAGE);
	memset(mem + 14 * PAGE, 0x22, 2 * PAGE);
	sink = mem[16 * PAGE];
	sink = mem[17 * PAGE];
	(void)sink;

	fd = open("/dev/ksm", O_RDWR);
	CHECK(fd >= 0, "open /dev/ksm");
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA");
	CHECK(region(sma, mem, NPAGES) == 0, "register region 1, %d pages", NPAGES);
	CHECK(pipe(go) == 0 && pipe(done) == 0, "pipes");
	if (check_failures)
		CHECK_DONE();

	child = fork();
	if (child == 0) {
		char *own = map_pages(CHILD_PAGES);
		memset(own, 0x44, (size_t)CHILD_PAGES * PAGE);
		close(go[1]);
		byte = region(sma, own, CHILD_PAGES) == 0;
		(void)!write(done[1], &byte, 1);
		(void)!read(go[0], &byte, 1); /* until "kill-child" closes the pipe */
		_exit(0);
	}
	CHECK(child > 0, "fork");
	close(go[0]);
	/* The child's region must be registered before the test starts counting. */
	CHECK(read(done[0], &byte, 1) == 1 && byte == 1, "the child registered its %d pages", CHILD_PAGES);
	if (check_failures)
		CHECK_DONE();
	printf("ready %d %#lx %d\n", (int)getpid(), (unsigned long)(uintptr_t)mem, (int)child);
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin)) {
		if (!strcmp(line, "tick\n")) {
			stamp(mem + 12 * PAGE);
			stamp(mem + 13 * PAGE);
			printf("ok tick\n");
		} else if (!strcmp(line, "pair\n")) {
			memset(mem + 18 * PAGE, 0x33, 2 * PAGE);
			printf("ok pair\n");
		} else if (!strcmp(line, "final\n")) {
			stamp(mem + 15 * PAGE);
			stamp(mem + 20 * PAGE);
			printf("ok final\n");
		} else if (!strcmp(line, "kill-child\n")) {
			int status = -1;
			close(go[1]);
			printf("ok kill-child %d\n", waitpid(child, &status, 0) == child && status == 0);
		} else if (!strcmp(line, "register2\n")) {
			char *more = map_pages(MORE_PAGES);
			for (int i = 0; i < MORE_PAGES; i++)
				stamp(more + i * PAGE);
			printf("ok register2 %#lx %d\n", (unsigned long)(uintptr_t)more, region(sma, more, MORE_PAGES));
		} else {
			printf("unknown %s", line);
		}
		fflush(stdout);
	}
	close(sma);
	close(fd);
	return 0;
}
