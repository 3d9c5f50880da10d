/*
 * Load for the fault tests: open, create an SMA, register, and (unless told
 * to leak) close, in a loop; the test kills it at random moments, some of
 * them in the middle of a hand-out.  Prints one '.' per round.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <errno.h>
#include <stdio.h>

static char buf[4 * 4096] __attribute__((aligned(4096)));

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : -1;
	int leak = argc > 2 && argv[2][0] == 'l';
	struct ksm_memory_region region = {.npages = 4, .addr = (uintptr_t)buf};

	for (long n = 0; rounds < 0 || n < rounds; n++) {
		int fd = open("/dev/ksm", O_RDWR);
		int sma = fd >= 0 ? ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0) : -1;
		if (sma < 0 || ioctl(sma, KSM_REGISTER_MEMORY_REGION, &region) != 0) {
			printf("round %ld failed: fd %d sma %d errno %d\n", n, fd, sma, errno);
			return 1;
		}
		if (!leak) {
			close(sma);
			close(fd);
		}
		write(1, ".", 1);
	}
	return 0;
}
