/*
 * The 2009 /dev/ksm call sequence, unmodified, with every quirk of the
 * driver asserted: what an old program compiled against linux/ksm.h sees.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

#define NPAGES 16

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/dev/ksm";
	struct ksm_kthread_info info, got;
	struct ksm_memory_region region;
	struct stat st_dev, st_sma;
	int fd, sma, r;

	fd = open(path, O_RDWR);
	CHECK(fd >= 0, "open %s", path);
	if (fd < 0)
		CHECK_DONE();

	r = ioctl(fd, KSM_GET_API_VERSION, 0);
	CHECK(r == KSM_API_VERSION, "KSM_GET_API_VERSION returns %d", r);

	memset(&info, 0, sizeof(info));
	info.sleep = 1234;
	info.pages_to_scan = 77;
	info.flags = 0;
	r = ioctl(fd, KSM_START_STOP_KTHREAD, &info);
	CHECK(r == 0, "KSM_START_STOP_KTHREAD {sleep 1234, pages 77, flags 0} returns 0");

	memset(&got, 0xA5, sizeof(got));
	r = ioctl(fd, KSM_GET_INFO_KTHREAD, &got);
	CHECK(r == 0 && got.sleep == 1234 && got.pages_to_scan == 77 && got.flags == 0,
	      "KSM_GET_INFO_KTHREAD copies out although encoded _IOW (sleep %u pages %u flags %u)",
	      got.sleep, got.pages_to_scan, got.flags);

	/* Quirk: run flag with pages_to_scan 0 returns +1 (EPERM without the minus). */
	info.sleep = 9;
	info.pages_to_scan = 0;
	info.flags = ksm_control_flags_run;
	errno = 0;
	r = ioctl(fd, KSM_START_STOP_KTHREAD, &info);
	CHECK(r == 1 && errno == 0, "START with run flag and 0 pages returns positive 1, errno untouched (r %d)", r);
	memset(&got, 0, sizeof(got));
	ioctl(fd, KSM_GET_INFO_KTHREAD, &got);
	CHECK(got.sleep == 1234 && got.pages_to_scan == 77 && got.flags == 0,
	      "...and changes nothing");

	errno = 0;
	r = ioctl(fd, _IO(KSMIO, 0x7f), 0);
	CHECK(r == -1 && errno == EINVAL, "unknown command on the device: -1 EINVAL");
	errno = 0;
	r = ioctl(fd, KSM_REGISTER_MEMORY_REGION, &region);
	CHECK(r == -1 && errno == EINVAL, "SMA command on the device fd: -1 EINVAL");

	errno = 0;
	r = ioctl(fd, KSM_START_STOP_KTHREAD, (void *)8);
	CHECK(r == -1 && errno == EFAULT, "START with a bad pointer: -1 EFAULT");
	errno = 0;
	r = ioctl(fd, KSM_GET_INFO_KTHREAD, (void *)8);
	CHECK(r == -1 && errno == EFAULT, "GET_INFO with a bad pointer: -1 EFAULT");

	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0 && sma != fd, "KSM_CREATE_SHARED_MEMORY_AREA returns a new fd (%d, device fd %d)", sma, fd);
	if (sma < 0)
		CHECK_DONE();
	CHECK(fcntl(sma, F_GETFD) >= 0, "the SMA fd is open in this process");
	CHECK(fstat(fd, &st_dev) == 0 && fstat(sma, &st_sma) == 0 && S_ISCHR(st_sma.st_mode) &&
		      st_sma.st_rdev == st_dev.st_rdev,
	      "the SMA fd is a file of the ksm device");

	char *buf = mmap(NULL, NPAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(buf != MAP_FAILED, "mmap %d pages", NPAGES);
	memset(buf, 0x5A, NPAGES * 4096);
	memset(&region, 0xCC, sizeof(region)); /* garbage in pad and reserved_bits, as qemu left them */
	region.npages = NPAGES;
	region.addr = (uintptr_t)buf;
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
	CHECK(r == 0, "KSM_REGISTER_MEMORY_REGION with garbage pad/reserved_bits returns 0");

	region.npages = 0;
	region.addr = 0x1003;
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
	CHECK(r == 0, "REGISTER validates nothing: npages 0 at an unaligned, unmapped address returns 0");

	errno = 0;
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, NULL);
	CHECK(r == -1 && errno == EFAULT, "REGISTER with a NULL pointer: -1 EFAULT");

	/* Quirk: unknown commands on an SMA return +22 (EINVAL without the minus). */
	errno = 0;
	r = ioctl(sma, KSM_GET_API_VERSION, 0);
	CHECK(r == 22 && errno == 0, "device command on the SMA fd returns positive 22 (r %d)", r);
	r = ioctl(sma, _IO(KSMIO, 0x55), 0);
	CHECK(r == 22, "unknown command on the SMA fd returns positive 22");

	r = ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0);
	CHECK(r == 0, "KSM_REMOVE_MEMORY_REGION returns 0");
	r = ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0);
	CHECK(r == 0, "a second REMOVE on the empty SMA returns 0");
	r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
	CHECK(r == 0, "the SMA takes regions again after REMOVE");

	CHECK(close(sma) == 0, "close the SMA fd");
	CHECK(close(fd) == 0, "close the device fd");
	munmap(buf, NPAGES * 4096);
	CHECK_DONE();
}
