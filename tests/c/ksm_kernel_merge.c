/*
 * A 2009 /dev/ksm caller for --merge kernel (tests/integration/test_kernel_merge.py):
 * the ioctls of include/linux/ksm.h and plain libc, nothing of today's KSM.
 *
 *   ksm_kernel_merge [MIB [PAGES_TO_SCAN [SLEEP_US]]]    (default 64 5000 10000)
 *
 * Maps MIB MiB of private anonymous memory, writes page i with pattern
 * i % 4 (four distinct contents, so a full merge is 4 shared pages and
 * MIB * 256 - 4 sharing) and registers it through the device
 * ($CUSE_KSM_DEVICE, default /dev/ksm).  Prints "ready PID ADDR NPAGES",
 * then runs one command per line of stdin, each answered by CHECK lines and
 * one line "done COMMAND":
 *
 *   start   KSM_START_STOP_KTHREAD: run, PAGES_TO_SCAN pages every SLEEP_US
 *           (a command, so that the test can measure the memory before)
 *   cow     write one byte of page 0: getrusage() must count a minor fault
 *           (the copy on write of a merged page), a second write to the same
 *           page none; the writer sees its byte, every other page its pattern
 *   check   every page holds its pattern (page 0 as cow left it)
 *   remove  KSM_REMOVE_MEMORY_REGION
 *   close   close the SMA fd (no REMOVE before it)
 *
 * At end of file it exits (with the SMA fd still open unless closed): PASS
 * if every check passed.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "check.h"

#define PAGE 4096UL
#define COW_OFFSET 100
#define COW_BYTE 0x7e

static unsigned char *mem;
static unsigned long npages;
static int cowed;

static unsigned char pattern(unsigned long i)
{
	return (unsigned char)(0xa0 + i % 4);
}

static long minflt(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

/* Pages that do not hold their pattern (page 0 after cow: its written byte). */
static unsigned long wrong_pages(void)
{
	unsigned long wrong = 0;

	for (unsigned long i = 0; i < npages; i++) {
		unsigned char *p = mem + i * PAGE;
		unsigned char want = pattern(i);
		int bad = 0;

		for (unsigned long j = 0; j < PAGE && !bad; j++)
			bad = p[j] != ((i == 0 && cowed && j == COW_OFFSET) ? COW_BYTE : want);
		wrong += bad;
	}
	return wrong;
}

int main(int argc, char **argv)
{
	unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
	unsigned to_scan = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 5000;
	unsigned sleep_us = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 0) : 10000;
	const char *path = getenv("CUSE_KSM_DEVICE") ? getenv("CUSE_KSM_DEVICE") : "/dev/ksm";
	struct ksm_kthread_info info = {.sleep = sleep_us, .pages_to_scan = to_scan, .flags = ksm_control_flags_run};
	struct ksm_memory_region region;
	char line[64];
	int fd, sma;

	npages = mib * 256;
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "mmap %lu MiB", mib);
	if (mem == MAP_FAILED)
		CHECK_DONE();
	for (unsigned long i = 0; i < npages; i++)
		memset(mem + i * PAGE, pattern(i), PAGE);

	fd = open(path, O_RDWR);
	CHECK(fd >= 0, "open %s", path);
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA gives fd %d", sma);
	region = (struct ksm_memory_region){.npages = (__u32)npages, .addr = (uintptr_t)mem};
	CHECK(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) == 0, "register %lu pages of 4 contents", npages);
	if (check_failures)
		CHECK_DONE();
	printf("ready %d %#lx %lu\n", (int)getpid(), (unsigned long)(uintptr_t)mem, npages);
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (!strcmp(line, "start")) {
			CHECK(ioctl(fd, KSM_START_STOP_KTHREAD, &info) == 0, "start the scanner: %u pages every %u us",
			      to_scan, sleep_us);
		} else if (!strcmp(line, "cow")) {
			long before, first, second;

			before = minflt();
			mem[COW_OFFSET] = COW_BYTE;
			first = minflt();
			mem[COW_OFFSET + 1] = pattern(0); /* the same value: the page is ours now */
			second = minflt();
			cowed = 1;
			CHECK(first > before, "writing a merged page takes a fault (minor faults %ld -> %ld)", before, first);
			CHECK(second == first, "a second write to it takes none (minor faults %ld -> %ld)", first, second);
			CHECK(wrong_pages() == 0, "the writer sees its byte, every other page its pattern");
		} else if (!strcmp(line, "check")) {
			unsigned long wrong = wrong_pages();

			CHECK(wrong == 0, "every page holds its pattern (%lu do not)", wrong);
		} else if (!strcmp(line, "remove")) {
			CHECK(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "KSM_REMOVE_MEMORY_REGION");
		} else if (!strcmp(line, "close")) {
			CHECK(close(sma) == 0, "close the SMA fd without REMOVE");
		} else {
			CHECK(0, "unknown command '%s'", line);
		}
		printf("done %s\n", line);
		fflush(stdout);
	}
	CHECK_DONE();
}
