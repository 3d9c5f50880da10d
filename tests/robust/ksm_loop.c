/*
 * Calls one /dev/ksm ioctl in a loop until killed, so that a SIGKILL lands
 * inside that very ioctl (tests/integration/test_robust_faults.py).
 *
 *   ksm_loop DEVICE api|create|start|info|register|remove [NPAGES]
 *
 * "create" closes each SMA fd it gets; "start" writes back the parameters it
 * read (so the scanner's settings do not change); "register" and "remove"
 * work on one SMA created first, REMOVE after every REGISTER, of 8 pages or
 * of NPAGES mapped but never touched but for the first 8 (with --merge
 * kernel, a long range makes REMOVE's MADV_UNMERGEABLE take long, since the
 * kernel walks every page of it).  Exits 1 on the first unexpected result,
 * printing it.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static char buf[8 * 4096] __attribute__((aligned(4096)));

static int fail(const char *what, long got)
{
	printf("%s returned %ld (errno %d %s)\n", what, got, errno, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	struct ksm_memory_region region = {.npages = 8, .addr = (uintptr_t)buf};
	struct ksm_kthread_info info;
	const char *op = argc > 2 ? argv[2] : "";
	int fd = argc > 1 ? open(argv[1], O_RDWR) : -1;
	int sma = -1;
	long r;

	if (fd < 0)
		return fail("open", fd);
	if (argc > 3) {
		char *m;

		region.npages = (__u32)strtoul(argv[3], NULL, 0);
		m = mmap(NULL, (size_t)region.npages * 4096, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (m == MAP_FAILED)
			return fail("mmap", -1);
		region.addr = (uintptr_t)m;
		memset(m, 0x42, sizeof(buf));
	}
	memset(buf, 0x42, sizeof(buf));
	if (!strcmp(op, "register") || !strcmp(op, "remove")) {
		sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
		if (sma < 0)
			return fail("KSM_CREATE_SHARED_MEMORY_AREA", sma);
	}
	if (ioctl(fd, KSM_GET_INFO_KTHREAD, &info) != 0)
		return fail("KSM_GET_INFO_KTHREAD", -1);
	write(1, "ready\n", 6);
	for (;;) {
		if (!strcmp(op, "api")) {
			if ((r = ioctl(fd, KSM_GET_API_VERSION, 0)) != KSM_API_VERSION)
				return fail("KSM_GET_API_VERSION", r);
		} else if (!strcmp(op, "create")) {
			if ((r = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0)) < 0)
				return fail("KSM_CREATE_SHARED_MEMORY_AREA", r);
			close((int)r);
		} else if (!strcmp(op, "start")) {
			if ((r = ioctl(fd, KSM_START_STOP_KTHREAD, &info)) != 0)
				return fail("KSM_START_STOP_KTHREAD", r);
		} else if (!strcmp(op, "info")) {
			if ((r = ioctl(fd, KSM_GET_INFO_KTHREAD, &info)) != 0)
				return fail("KSM_GET_INFO_KTHREAD", r);
		} else if (!strcmp(op, "register") || !strcmp(op, "remove")) {
			if ((r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region)) != 0)
				return fail("KSM_REGISTER_MEMORY_REGION", r);
			if ((r = ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0)) != 0)
				return fail("KSM_REMOVE_MEMORY_REGION", r);
		} else {
			printf("unknown op '%s'\n", op);
			return 2;
		}
	}
}
