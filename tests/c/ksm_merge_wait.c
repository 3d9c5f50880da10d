/*
 * Register N identical pages, start the scanner through the ioctl, and wait
 * while the test watches the control files (/run/cuse-ksm/ksm/pages_sharing
 * should reach N - 1, pages_shared 1).
 *
 *   ksm_merge_wait [NPAGES [PAGES_TO_SCAN [SLEEP_US]]]
 *
 * Prints "ready <pid> <addr>" once registered and started, then waits until
 * stdin reaches end of file (the test closes it), so it never outlives the test.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"

int main(int argc, char **argv)
{
	unsigned npages = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 64;
	unsigned to_scan = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 256;
	unsigned sleep_us = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 0) : 20000;
	struct ksm_kthread_info info = {.sleep = sleep_us, .pages_to_scan = to_scan, .flags = ksm_control_flags_run};
	struct ksm_memory_region region;
	char buf[64];
	char *mem;
	int fd, sma;

	mem = mmap(NULL, (size_t)npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "mmap %u pages", npages);
	if (mem == MAP_FAILED)
		CHECK_DONE();
	for (unsigned i = 0; i < npages; i++)
		memset(mem + (size_t)i * 4096, 0x5a, 4096); /* identical, and present */

	fd = open("/dev/ksm", O_RDWR);
	CHECK(fd >= 0, "open /dev/ksm");
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA gives fd %d", sma);
	region = (struct ksm_memory_region){.npages = npages, .addr = (uintptr_t)mem};
	CHECK(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) == 0, "register %u identical pages", npages);
	CHECK(ioctl(fd, KSM_START_STOP_KTHREAD, &info) == 0, "start the scanner: %u pages every %u us", to_scan,
	      sleep_us);
	if (check_failures)
		CHECK_DONE();

	printf("ready %d %#lx\n", (int)getpid(), (unsigned long)(uintptr_t)mem);
	fflush(stdout);
	while (read(0, buf, sizeof(buf)) > 0)
		;
	/* Leave the SMA to close(): its release drops the region. */
	close(sma);
	close(fd);
	CHECK_DONE();
}
