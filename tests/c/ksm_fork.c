/*
 * An SMA fd inherited across fork(): the child registers its own memory
 * through it (REGISTER always uses the mm of whoever calls it).
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

int main(void)
{
	int fd, sma, status;
	pid_t child;
	char *buf = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct ksm_memory_region region = {.npages = 8, .addr = (uintptr_t)buf};

	fd = open("/dev/ksm", O_RDWR | O_TRUNC); /* qemu-kvm opened it with O_TRUNC */
	CHECK(fd >= 0, "open /dev/ksm with O_TRUNC");
	sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
	CHECK(sma >= 0 && sma != fd, "parent created SMA fd %d", sma);

	child = fork();
	if (child == 0) {
		int r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
		int q = ioctl(sma, _IO(KSMIO, 0x33), 0);
		_exit(r == 0 && q == 22 ? 0 : 1);
	}
	CHECK(child > 0, "fork");
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "child registered its memory through the inherited SMA fd");
	CHECK(ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) == 0, "parent registers through the same SMA after the child exited");
	CHECK(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "REMOVE drops both processes' regions");
	close(sma);
	close(fd);
	CHECK_DONE();
}
