/*
 * --merge kernel: a caller that is already traced (as under a debugger)
 * REGISTERs a region.  The daemon cannot borrow it to madvise, so the host
 * kernel will not merge the region, yet the ioctl returns 0 as the 2009
 * driver's did (tests/integration/test_kernel_merge.py reads the log and the
 * regions file).
 *
 * The child opens the device ($CUSE_KSM_DEVICE, default /dev/ksm) and gets
 * its SMA fd while untraced, then the parent PTRACE_SEIZEs it and the child
 * registers 16 pages.  Prints "tracer PID", then the child prints
 * "registered PID ADDR NPAGES" and both wait until stdin reaches end of file.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define NPAGES 16

int main(void)
{
	const char *path = getenv("CUSE_KSM_DEVICE") ? getenv("CUSE_KSM_DEVICE") : "/dev/ksm";
	int ready[2], go[2], status;
	char c;
	pid_t child;

	if (pipe(ready) != 0 || pipe(go) != 0)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	child = fork();
	if (child == 0) {
		struct ksm_memory_region region = {.npages = NPAGES};
		char buf[64];
		char *mem;
		int fd, sma;
		long r;

		fd = open(path, O_RDWR);
		sma = fd >= 0 ? ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0) : -1;
		mem = mmap(NULL, NPAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (sma < 0 || mem == MAP_FAILED)
			_exit(3);
		memset(mem, 0x5b, NPAGES * 4096);
		region.addr = (uintptr_t)mem;
		if (write(ready[1], "r", 1) != 1 || read(go[0], &c, 1) != 1)
			_exit(2);
		r = ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region);
		printf("registered %d %#lx %d\n", (int)getpid(), (unsigned long)(uintptr_t)mem, NPAGES);
		while (read(0, buf, sizeof(buf)) > 0)
			;
		/* exit code: 0 = the 2009 result, and the device still answers */
		_exit(r == 0 && ioctl(fd, KSM_GET_API_VERSION, 0) == KSM_API_VERSION ? 0 : 10);
	}
	CHECK(read(ready[0], &c, 1) == 1, "child %d has its SMA fd", (int)child);
	CHECK(ptrace(PTRACE_SEIZE, child, 0, 0) == 0, "parent traces its child, as a debugger would");
	printf("tracer %d\n", (int)getpid());
	CHECK(write(go[1], "g", 1) == 1, "child told to register");
	while (waitpid(child, &status, __WALL) == child && !WIFEXITED(status) && !WIFSIGNALED(status))
		ptrace(PTRACE_CONT, child, 0, 0);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "REGISTER from a traced thread returns 0 and the device keeps answering (child status %d)",
	      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	CHECK_DONE();
}
