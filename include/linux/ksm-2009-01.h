/*
 * include/linux/ksm-2009-01.h - user-space interface of /dev/ksm as the kvm
 * tree's out-of-tree ksm.ko defined it in January 2009, provided by cuse-ksm.
 *
 * Programs built against that module (its ksmctl, the kvm tree's qemu)
 * compile against this header unchanged: same ioctl numbers, same 16-, 12-
 * and 8-byte structures.  cuse-ksm answers this ABI and the March 2009 one
 * (<linux/ksm.h>) on the same device; a program includes one of the two,
 * since both define struct ksm_memory_region and struct ksm_kthread_info.
 * Written for cuse-ksm from the published ABI; it contains no kernel code.
 */
#ifndef __LINUX_KSM_H
#define __LINUX_KSM_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define KSM_API_VERSION 1

/* ksm_kthread_info.flags (and ksm_user_scan.flags): bit 0 runs the scanner. */
#define ksm_control_flags_run 1

/* Argument of KSM_REGISTER_MEMORY_REGION. 16 bytes. */
struct ksm_memory_region {
	__u32 npages;		/* length of the region, in pages */
	__u32 pad;		/* ignored */
	__u64 addr;		/* start address, in the calling process */
};

/* Argument of KSM_SCAN (on a scan fd). 8 bytes. */
struct ksm_user_scan {
	__u32 pages_to_scan;	/* pages to scan in this call */
	__u32 flags;		/* ksm_control_flags_run */
};

/* Argument of KSM_START_STOP_KTHREAD and KSM_GET_INFO_KTHREAD. 12 bytes. */
struct ksm_kthread_info {
	__u32 sleep;		/* microseconds to sleep between batches */
	__u32 pages_to_scan;	/* pages scanned per batch */
	__u32 flags;		/* ksm_control_flags_run */
};

#define KSMIO 0xAB

/* ioctls on /dev/ksm itself */
#define KSM_GET_API_VERSION		_IO(KSMIO, 0x00)	/* returns KSM_API_VERSION */
#define KSM_CREATE_SHARED_MEMORY_AREA	_IO(KSMIO, 0x01)	/* returns a new SMA fd */
#define KSM_CREATE_SCAN			_IO(KSMIO, 0x02)	/* returns a new scan fd */
#define KSM_START_STOP_KTHREAD		_IOW(KSMIO, 0x03, struct ksm_kthread_info)
/* Encoded _IOW, yet the driver copies the structure OUT to the caller. */
#define KSM_GET_INFO_KTHREAD		_IOW(KSMIO, 0x04, struct ksm_kthread_info)

/* ioctls on a shared memory area (SMA) fd */
#define KSM_REGISTER_MEMORY_REGION	_IOW(KSMIO, 0x20, struct ksm_memory_region)
#define KSM_REMOVE_MEMORY_REGION	_IO(KSMIO, 0x21)	/* drops every region of the SMA */

/*
 * ioctls on a scan fd.  The January driver left KSM_SCAN unimplemented:
 * it, like any other request on a scan fd, returns 22 (positive).
 */
#define KSM_SCAN			_IOW(KSMIO, 0x40, struct ksm_user_scan)

#endif /* __LINUX_KSM_H */
