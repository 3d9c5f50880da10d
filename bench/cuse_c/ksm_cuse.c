/*
 * A minimal CUSE server in C on libfuse3 (cuse_lowlevel.h): the transport's
 * limit, to compare the Python daemon with.  It answers the /dev/ksm ioctls
 * that need no memory of the caller the way the daemon does, RETRY dance
 * included (CUSE_UNRESTRICTED_IOCTL: the first call carries no data):
 *
 *   KSM_GET_API_VERSION      1
 *   KSM_START_STOP_KTHREAD   retry {arg, 24} in; then +1 quirk or store, 0
 *   KSM_GET_INFO_KTHREAD     retry {arg, 24} out; then the 24 bytes, 0
 *   anything else            -EINVAL
 *
 * No SMAs, no scanner.  Usage: ksm_cuse [-s] [-f] [-d] --name NAME
 * (libfuse's options: -f foreground, -s single-threaded, -d debug).
 */
#define FUSE_USE_VERSION 31
#include <cuse_lowlevel.h>
#include <errno.h>
#include <fuse_opt.h>
#include <linux/ksm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

static struct ksm_kthread_info info;

static void ksm_open(fuse_req_t req, struct fuse_file_info *fi)
{
	fuse_reply_open(req, fi);
}

static void ksm_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi, unsigned flags,
		      const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	struct iovec iov = {arg, sizeof(info)};
	struct ksm_kthread_info in;

	(void)fi;
	if (flags & FUSE_IOCTL_COMPAT) {
		fuse_reply_err(req, ENOTTY);
		return;
	}
	switch ((unsigned)cmd) {
	case KSM_GET_API_VERSION:
		fuse_reply_ioctl(req, KSM_API_VERSION, NULL, 0);
		break;
	case KSM_START_STOP_KTHREAD:
		if (in_bufsz < sizeof(in)) {
			fuse_reply_ioctl_retry(req, &iov, 1, NULL, 0);
			break;
		}
		memcpy(&in, in_buf, sizeof(in));
		if ((in.flags & ksm_control_flags_run) && in.pages_to_scan == 0) {
			fuse_reply_ioctl(req, EPERM, NULL, 0); /* the 2009 driver's positive 1 */
			break;
		}
		info.sleep = in.sleep;
		info.pages_to_scan = in.pages_to_scan;
		info.flags = in.flags;
		fuse_reply_ioctl(req, 0, NULL, 0);
		break;
	case KSM_GET_INFO_KTHREAD:
		if (out_bufsz < sizeof(info)) {
			fuse_reply_ioctl_retry(req, NULL, 0, &iov, 1);
			break;
		}
		fuse_reply_ioctl(req, 0, &info, sizeof(info));
		break;
	default:
		fuse_reply_err(req, EINVAL);
	}
}

static const struct cuse_lowlevel_ops ops = {
	.open = ksm_open,
	.ioctl = ksm_ioctl,
};

int main(int argc, char **argv)
{
	static char devname[128];
	const char *dev_info_argv[] = {devname};
	struct cuse_info ci;
	char *name = "ksmc";
	char *args[16];
	int n = 0;

	for (int i = 0; i < argc && n < 15; i++) {
		if (!strcmp(argv[i], "--name") && i + 1 < argc)
			name = argv[++i];
		else
			args[n++] = argv[i];
	}
	args[n] = NULL;
	snprintf(devname, sizeof(devname), "DEVNAME=%s", name);
	memset(&ci, 0, sizeof(ci));
	ci.dev_info_argc = 1;
	ci.dev_info_argv = dev_info_argv;
	ci.flags = CUSE_UNRESTRICTED_IOCTL;
	return cuse_lowlevel_main(n, args, &ci, &ops, NULL);
}
