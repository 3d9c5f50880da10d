/*
 * A program of the kvm tree's January 2009 ksm.ko, compiled against
 * include/linux/ksm-2009-01.h and run unmodified on cuse-ksm's /dev/ksm.
 *
 *   ksm_2009_01 [sequence] [DEVICE]
 *	every January call, with each quirk of that driver asserted;
 *   ksm_2009_01 merge NPAGES FILL
 *	register NPAGES pages of byte FILL through the January ABI, start the
 *	scanner with the January START_STOP (256 pages every 20 ms), print
 *	"ready <pid> <addr>" and wait until stdin reaches end of file.
 *
 * The structs are placed at the very end of a mapping, before a PROT_NONE
 * page: a driver that read or wrote more than the January size (12 or 16
 * bytes, not March's 24) would fault.
 */
#include <fcntl.h>
#include <linux/ksm-2009-01.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

#define PAGE 4096

/* A pointer to SIZE bytes that end exactly where a PROT_NONE page begins. */
static void *at_edge(size_t size)
{
	char *two = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (two == MAP_FAILED || mprotect(two + PAGE, PAGE, PROT_NONE) != 0)
		return NULL;
	return two + PAGE - size;
}

static int same_device(int a, int b)
{
	struct stat sa, sb;
	return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && S_ISCHR(sb.st_mode) && sa.st_rdev == sb.st_rdev;
}

static int sequence(const char *path)
{
	struct ksm_kthread_info *info = at_edge(sizeof(*info));
	struct ksm_memory_region *region = at_edge(sizeof(*region));
	unsigned char canary[24 + 12];
	int fd, sma, scan, r;

	CHECK(sizeof(struct ksm_kthread_info) == 12 && sizeof(struct ksm_memory_region) == 16 &&
		      sizeof(struct ksm_user_scan) == 8,
	      "the January structs: 12, 16 and 8 bytes");
	CHECK(info && region, "structs placed before a PROT_NONE page");
	fd = open(path, O_RDWR);
	CHECK(fd >= 0, "open %s", path);
	if (fd < 0 || !info || !region)
		CHECK_DONE();

	r = ioctl(fd, KSM_GET_API_VERSION, 0);
	CHECK(r == KSM_API_VERSION, "KSM_GET_API_VERSION returns %d", r);

	*info = (struct ksm_kthread_info){.sleep = 4321, .pages_to_scan = 55, .flags = 0};
	r = ioctl(fd, KSM_START_STOP_KTHREAD, info);
	CHECK(r == 0, "KSM_START_STOP_KTHREAD reads 12 bytes at the edge of a mapping (r %d)", r);
	memset(info, 0xA5, sizeof(*info));
	r = ioctl(fd, KSM_GET_INFO_KTHREAD, info);
	CHECK(r == 0 && info->sleep == 4321 && info->pages_to_scan == 55 && info->flags == 0,
	      "KSM_GET_INFO_KTHREAD writes 12 bytes at the edge (sleep %u pages %u flags %u)", info->sleep,
	      info->pages_to_scan, info->flags);

	/* GET_INFO copies out 12 bytes, not 24: what follows the struct is untouched. */
	memset(canary, 0x5C, sizeof(canary));
	r = ioctl(fd, KSM_GET_INFO_KTHREAD, canary);
	CHECK(r == 0 && canary[11] == 0 && canary[12] == 0x5C && canary[23] == 0x5C,
	      "GET_INFO leaves the bytes after its 12 alone");

	/* Same quirk as March: the run flag with pages_to_scan 0 returns +1, and changes nothing. */
	*info = (struct ksm_kthread_info){.sleep = 9, .pages_to_scan = 0, .flags = ksm_control_flags_run};
	errno = 0;
	r = ioctl(fd, KSM_START_STOP_KTHREAD, info);
	CHECK(r == 1 && errno == 0, "START with run flag and 0 pages returns positive 1 (r %d)", r);
	ioctl(fd, KSM_GET_INFO_KTHREAD, info);
	CHECK(info->sleep == 4321 && info->pages_to_scan == 55 && info->flags == 0, "...and changes nothing");

	errno = 0;
	r = ioctl(fd, KSM_START_STOP_KTHREAD, (void *)8);
	CHECK(r == -1 && errno == EFAULT, "START with a bad pointer: -1 EFAULT");
	errno = 0;
	r = ioctl(fd, _IO(KSMIO, 0x7f), 0);
	CHECK(r == -1 && errno == EINVAL, "unknown command on the device: -1 EINVAL");
	errno = 0;
	r = ioctl(fd, KSM_SCAN, 0);
	CHECK(r == -1 && errno == EINVAL, "KSM_SCAN on the device fd: -1 EINVAL");

	/* The scan fd: a file of the device, on which every call returns +22. */
	scan = ioctl(fd, KSM_CREATE_SCAN, 0);
	CHECK(scan >= 0 && scan != fd && same_device(fd, scan), "KSM_CREATE_SCAN returns a new fd of the device (%d)",
	      scan);
	if (scan >= 0) {
		struct ksm_user_scan user = {.pages_to_scan = 100, .flags = ksm_control_flags_run};
		errno = 0;
		r = ioctl(scan, KSM_SCAN, &user);
		CHECK(r == 22 && errno == 0, "KSM_SCAN returns positive 22: the driver left it unimplemented (r %d)", r);
		r = ioctl(scan, KSM_SCAN, (void *)8);
		CHECK(r == 22, "KSM_SCAN with a bad pointer: 22 too, the pointer is never read");
		r = ioctl(scan, KSM_GET_API_VERSION, 0);
		CHECK(r == 22, "any other call on the scan fd: 22");
		CHECK(close(scan) == 0, "close the scan fd");
	}

	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0 && same_device(fd, sma), "KSM_CREATE_SHARED_MEMORY_AREA returns an SMA fd (%d)", sma);
	if (sma < 0)
		CHECK_DONE();
	char *buf = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(buf, 0x3C, 8 * PAGE);
	*region = (struct ksm_memory_region){.npages = 8, .pad = 0xCCCCCCCC, .addr = (uintptr_t)buf};
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, region);
	CHECK(r == 0, "KSM_REGISTER_MEMORY_REGION reads 16 bytes at the edge of a mapping (r %d)", r);
	*region = (struct ksm_memory_region){.npages = 0, .addr = 0x1003};
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, region);
	CHECK(r == 0, "REGISTER validates nothing: npages 0 at an unaligned address returns 0");
	errno = 0;
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, NULL);
	CHECK(r == -1 && errno == EFAULT, "REGISTER with a NULL pointer: -1 EFAULT");
	errno = 0;
	r = ioctl(sma, KSM_CREATE_SCAN, 0);
	CHECK(r == 22 && errno == 0, "a device call on the SMA fd returns positive 22 (r %d)", r);
	r = ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0);
	CHECK(r == 0, "KSM_REMOVE_MEMORY_REGION returns 0");

	CHECK(close(sma) == 0, "close the SMA fd");
	CHECK(close(fd) == 0, "close the device fd");
	CHECK_DONE();
}

static int merge(unsigned npages, int fill)
{
	struct ksm_kthread_info info = {.sleep = 20000, .pages_to_scan = 256, .flags = ksm_control_flags_run};
	struct ksm_memory_region region;
	char line[64];
	char *mem = mmap(NULL, (size_t)npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd, sma;

	CHECK(mem != MAP_FAILED, "mmap %u pages", npages);
	if (mem == MAP_FAILED)
		CHECK_DONE();
	memset(mem, fill, (size_t)npages * PAGE);
	fd = open("/dev/ksm", O_RDWR);
	CHECK(fd >= 0, "open /dev/ksm");
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA gives fd %d", sma);
	region = (struct ksm_memory_region){.npages = npages, .addr = (uintptr_t)mem};
	CHECK(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) == 0, "register %u pages of %#x", npages, fill);
	CHECK(ioctl(fd, KSM_START_STOP_KTHREAD, &info) == 0, "start the scanner through the January ABI");
	if (check_failures)
		CHECK_DONE();
	printf("ready %d %#lx\n", (int)getpid(), (unsigned long)(uintptr_t)mem);
	fflush(stdout);
	while (read(0, line, sizeof(line)) > 0)
		;
	close(sma);
	close(fd);
	CHECK_DONE();
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "merge") == 0 && argc == 4)
		return merge((unsigned)strtoul(argv[2], NULL, 0), (int)strtol(argv[3], NULL, 0));
	if (argc > 1 && strcmp(argv[1], "sequence") == 0)
		return sequence(argc > 2 ? argv[2] : "/dev/ksm");
	fprintf(stderr, "usage: %s sequence [DEVICE] | merge NPAGES FILL\n", argv[0]);
	return 2;
}
