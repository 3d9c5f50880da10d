/*
 * Issue 14's example: a region of 2^32-1 pages at an unmapped address,
 * then a real one of 256 identical pages, both registered through one SMA
 * (the 2009 driver validated neither and returned 0 for both).  The test
 * (tests/integration/test_holes_vm.py) then runs `ksmctl start 5000 100`
 * and waits for pages_sharing 255: the scanner must pass over the four
 * billion pages that do not exist.
 *
 *   ksm_holes
 *
 * Prints "ready <pid> <real region's addr>" once both are registered, then
 * waits until stdin reaches end of file; closing the SMA drops both.
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

#define HOLE_ADDR 0x100000000000UL /* 16 TiB: nothing is mapped there (checked) */
#define REAL_PAGES 256

int main(void)
{
	const char *dev = getenv("CUSE_KSM_DEVICE") ? getenv("CUSE_KSM_DEVICE") : "/dev/ksm";
	struct ksm_memory_region hole = {.npages = 0xffffffffU, .addr = HOLE_ADDR};
	struct ksm_memory_region real = {.npages = REAL_PAGES};
	unsigned char vec;
	char buf[64];
	char *mem;
	int fd, sma;

	/* mincore fails with ENOMEM on an unmapped page. */
	CHECK(mincore((void *)HOLE_ADDR, 4096, &vec) == -1 && errno == ENOMEM, "nothing mapped at %#lx", HOLE_ADDR);
	mem = mmap(NULL, REAL_PAGES * 4096UL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "mmap %d pages", REAL_PAGES);
	if (mem == MAP_FAILED)
		CHECK_DONE();
	madvise(mem, REAL_PAGES * 4096UL, MADV_NOHUGEPAGE); /* may fail without THP: harmless */
	memset(mem, 0x5a, REAL_PAGES * 4096UL); /* identical, and present */
	real.addr = (uintptr_t)mem;

	fd = open(dev, O_RDWR);
	CHECK(fd >= 0, "open %s", dev);
	sma = fd >= 0 ? ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0) : -1;
	CHECK(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA");
	CHECK(sma >= 0 && ioctl(sma, KSM_REGISTER_MEMORY_REGION, &hole) == 0, "register 2^32-1 unmapped pages: 0");
	CHECK(sma >= 0 && ioctl(sma, KSM_REGISTER_MEMORY_REGION, &real) == 0, "register %d real pages: 0", REAL_PAGES);
	if (check_failures)
		CHECK_DONE();
	printf("ready %d %p\n", (int)getpid(), (void *)mem);
	fflush(stdout);
	while (read(0, buf, sizeof(buf)) > 0)
		;
	close(sma);
	close(fd);
	CHECK_DONE();
}
