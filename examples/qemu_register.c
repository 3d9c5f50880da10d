/*
 * qemu_register: registers "guest RAM" with /dev/ksm the way qemu-kvm's
 * ksm_register_memory did in 2009, then behaves as a small idle guest.
 * Rewritten for cuse-ksm from that behaviour; no original code.
 *
 *   qemu_register [-m MIB] [-d PERCENT] [-s SECONDS]
 *
 *   -m  guest RAM in MiB (default 64)
 *   -d  percentage of guest pages with identical content (default 50):
 *       zero-filled "free" guest memory; the others differ from each other
 *   -s  run that long, then exit (default 0: until killed)
 *
 * What qemu-kvm did, and this program does:
 *   - open("/dev/ksm", O_RDWR | O_TRUNC);
 *   - ksm_fd = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA);
 *   - a struct ksm_memory_region on the stack with only npages and addr
 *     filled in: pad and reserved_bits are garbage (here deliberately so);
 *   - ioctl(ksm_fd, KSM_REGISTER_MEMORY_REGION, &region) for guest RAM;
 *   - keep both fds open for the life of the process: no GET_API_VERSION,
 *     no REMOVE; exit (or a kill) closes them, which drops the region.
 * It does not start the scanner (qemu never did; see ksmctl).
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

int main(int argc, char **argv)
{
	const char *dev = getenv("KSM_DEVICE") ? getenv("KSM_DEVICE") : "/dev/ksm";
	unsigned long mib = 64, percent = 50, seconds = 0, npages, ndup = 0, i;
	struct ksm_memory_region region;
	int opt, fd, ksm_fd;
	char *ram;

	while ((opt = getopt(argc, argv, "m:d:s:")) != -1) {
		switch (opt) {
		case 'm':
			mib = strtoul(optarg, NULL, 0);
			break;
		case 'd':
			percent = strtoul(optarg, NULL, 0);
			break;
		case 's':
			seconds = strtoul(optarg, NULL, 0);
			break;
		default:
			fprintf(stderr, "usage: qemu_register [-m MIB] [-d PERCENT] [-s SECONDS]\n");
			return 2;
		}
	}
	if (!mib || percent > 100) {
		fprintf(stderr, "qemu_register: -m must be > 0, -d at most 100\n");
		return 2;
	}
	npages = mib * (1024 * 1024 / PAGE);
	ram = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED) {
		perror("mmap guest RAM");
		return 1;
	}
	/* The guest has booted: some pages hold the same thing (zeroed free
	 * memory), spread over RAM; the rest are all different. */
	for (i = 0; i < npages; i++) {
		char *p = ram + i * PAGE;

		if (i % 100 < percent) {
			memset(p, 0, PAGE);
			ndup++;
		} else {
			memset(p, 0x90, PAGE);
			memcpy(p, &i, sizeof(i));
			memcpy(p + PAGE - sizeof(i), &i, sizeof(i));
		}
	}

	fd = open(dev, O_RDWR | O_TRUNC);
	if (fd < 0) {
		perror(dev);
		return 1;
	}
	ksm_fd = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA);
	if (ksm_fd < 0) {
		perror("KSM_CREATE_SHARED_MEMORY_AREA");
		return 1;
	}
	memset(&region, 0xa5, sizeof(region)); /* stack garbage, on purpose */
	region.npages = (__u32)npages;
	region.addr = (uintptr_t)ram;
	if (ioctl(ksm_fd, KSM_REGISTER_MEMORY_REGION, &region) < 0) {
		perror("KSM_REGISTER_MEMORY_REGION");
		return 1;
	}
	printf("qemu_register: pid %d: %lu MiB of guest RAM (%lu pages at %p) registered, %lu identical, "
	       "pad %#x reserved_bits %#llx\n",
	       (int)getpid(), mib, npages, (void *)ram, ndup, region.pad, (unsigned long long)region.reserved_bits);
	fflush(stdout);

	if (!seconds) {
		for (;;)
			pause();
	}
	sleep((unsigned)seconds);
	return 0; /* exit closes ksm_fd and fd: the region goes with them */
}
