/*
 * A /dev/ksm client driven line by line on stdin, for the fault tests
 * (tests/integration/test_robust_faults.py).  Each command answers one line
 * on stdout, "ok ..." or "err ...":
 *
 *   sma               KSM_CREATE_SHARED_MEMORY_AREA; becomes the current SMA
 *   reg N BYTE        map N pages filled with BYTE, register them on the current SMA
 *   shared N BYTE     the same with a MAP_SHARED mapping
 *   remove            KSM_REMOVE_MEMORY_REGION on the current SMA
 *   unmap             munmap the last region (still registered)
 *   remap BYTE        a new mapping at the same address, filled with BYTE
 *   api               KSM_GET_API_VERSION on the device fd
 *   again             KSM_REGISTER_MEMORY_REGION of the last region again
 *   forkreg N BYTE    fork; the child waits until this process has exited,
 *                     then maps N pages of BYTE and registers them through the
 *                     inherited SMA fd, prints "child PID RESULT ERRNO" and
 *                     sleeps until killed
 *   close             close the current SMA fd and the device fd
 *   exit              _exit(0) without closing anything
 *
 * Usage: ksm_client DEVICE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static char *map_fill(char *at, size_t npages, int byte, int shared)
{
	int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | (at ? MAP_FIXED : 0);
	char *m = mmap(at, npages * PAGE, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (m != MAP_FAILED)
		memset(m, byte, npages * PAGE);
	return m;
}

int main(int argc, char **argv)
{
	char line[256], cmd[32];
	int dev, sma = -1;
	struct ksm_memory_region region = {0};
	char *mem = NULL;
	long r;

	if (argc < 2)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	dev = open(argv[1], O_RDWR);
	if (dev < 0) {
		printf("err open %d\n", errno);
		return 1;
	}
	printf("ok pid %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		unsigned n = 0;
		int byte = 0;
		if (sscanf(line, "%31s %u %i", cmd, &n, &byte) < 1)
			continue;
		if (!strcmp(cmd, "sma")) {
			sma = ioctl(dev, KSM_CREATE_SHARED_MEMORY_AREA, 0);
			printf(sma >= 0 ? "ok %d\n" : "err %d\n", sma >= 0 ? sma : errno);
		} else if (!strcmp(cmd, "reg") || !strcmp(cmd, "shared")) {
			mem = map_fill(NULL, n, byte, !strcmp(cmd, "shared"));
			region.npages = n;
			region.addr = (uintptr_t)mem;
			r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
			printf(r == 0 ? "ok %lx\n" : "err %ld\n", r == 0 ? (long)region.addr : (long)errno);
		} else if (!strcmp(cmd, "again")) {
			r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
			printf(r == 0 ? "ok\n" : "err %ld\n", (long)errno);
		} else if (!strcmp(cmd, "remove")) {
			r = ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0);
			printf(r == 0 ? "ok\n" : "err %ld\n", (long)errno);
		} else if (!strcmp(cmd, "unmap")) {
			printf(munmap(mem, region.npages * PAGE) == 0 ? "ok\n" : "err\n");
		} else if (!strcmp(cmd, "remap")) {
			printf(map_fill(mem, region.npages, (int)n, 0) == mem ? "ok\n" : "err\n");
		} else if (!strcmp(cmd, "api")) {
			r = ioctl(dev, KSM_GET_API_VERSION, 0);
			printf(r >= 0 ? "ok %ld\n" : "err %ld\n", r >= 0 ? r : (long)errno);
		} else if (!strcmp(cmd, "forkreg")) {
			pid_t parent = getpid();
			pid_t child = fork();
			if (child == 0) {
				while (getppid() == parent)
					usleep(1000);
				char *m = map_fill(NULL, n, byte, 0);
				struct ksm_memory_region reg = {.npages = n, .addr = (uintptr_t)m};
				r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &reg);
				printf("child %d %ld %d\n", getpid(), r, r ? errno : 0);
				for (;;)
					pause();
			}
			printf(child > 0 ? "ok %d\n" : "err %d\n", child > 0 ? child : errno);
		} else if (!strcmp(cmd, "close")) {
			printf(close(sma) == 0 && close(dev) == 0 ? "ok\n" : "err %d\n", errno);
		} else if (!strcmp(cmd, "exit")) {
			_exit(0);
		} else {
			printf("err unknown\n");
		}
	}
	return 0;
}
