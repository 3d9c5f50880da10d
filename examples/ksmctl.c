/*
 * ksmctl: start, stop and query the KSM scanner (kksmd) through /dev/ksm,
 * as the control tool that came with the 2009 driver did.  Rewritten for
 * cuse-ksm from its documented behaviour; no original code.
 *
 *   ksmctl start PAGES_TO_SCAN SLEEP_US   run the scanner (flags = 1)
 *   ksmctl stop                           stop it (flags = 0)
 *   ksmctl info                           print flags, pages_to_scan, sleep
 *
 * Like the original, "stop" fills in only flags and passes the other fields
 * of its stack structure as they happen to be (the driver stores them).  And
 * like the original, "start" with PAGES_TO_SCAN 0 gets the driver's positive
 * 1 (EPERM without the minus), which ioctl() reports as success; we say so.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static void usage(void)
{
	fprintf(stderr, "usage: ksmctl start PAGES_TO_SCAN SLEEP_US | stop | info\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *dev = getenv("KSM_DEVICE") ? getenv("KSM_DEVICE") : "/dev/ksm";
	struct ksm_kthread_info info;
	int fd, r;

	if (argc < 2)
		usage();
	fd = open(dev, O_RDWR);
	if (fd < 0) {
		perror(dev);
		return 1;
	}
	if (!strcmp(argv[1], "start")) {
		if (argc != 4)
			usage();
		info.pages_to_scan = (__u32)strtoul(argv[2], NULL, 0);
		info.sleep = (__u32)strtoul(argv[3], NULL, 0);
		info.flags = ksm_control_flags_run;
		r = ioctl(fd, KSM_START_STOP_KTHREAD, &info);
		if (r < 0) {
			perror("KSM_START_STOP_KTHREAD");
			return 1;
		}
		if (r > 0)
			fprintf(stderr, "ksmctl: the driver returned %d: nothing changed (pages_to_scan must not be 0)\n",
				r);
	} else if (!strcmp(argv[1], "stop")) {
		if (argc != 2)
			usage();
		info.flags = 0; /* the rest as the stack left it, as in 2009 */
		if (ioctl(fd, KSM_START_STOP_KTHREAD, &info) < 0) {
			perror("KSM_START_STOP_KTHREAD");
			return 1;
		}
	} else if (!strcmp(argv[1], "info")) {
		if (argc != 2)
			usage();
		memset(&info, 0, sizeof(info));
		if (ioctl(fd, KSM_GET_INFO_KTHREAD, &info) < 0) {
			perror("KSM_GET_INFO_KTHREAD");
			return 1;
		}
		printf("flags %u, pages_to_scan %u, sleep %u\n", info.flags, info.pages_to_scan, info.sleep);
	} else {
		usage();
	}
	close(fd);
	return 0;
}
