/*
 * include/linux/ksm.h - user-space interface of /dev/ksm, as defined by the
 * 2009 "add ksm kernel shared memory driver" patch, provided by cuse-ksm.
 *
 * Programs written against the 2009 driver compile against this header
 * unchanged: the ioctl numbers and the two 24-byte structures are the same.
 * Written for cuse-ksm from the published ABI; it contains no kernel code.
 */
#ifndef __LINUX_KSM_H
#define __LINUX_KSM_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define KSM_API_VERSION 1

/* ksm_kthread_info.flags: bit 0 runs the scanner (kksmd). */
#define ksm_control_flags_run 1

/* Argument of KSM_REGISTER_MEMORY_REGION. 24 bytes, no implicit padding. */
struct ksm_memory_region {
	__u32 npages;		/* length of the region, in pages */
	__u32 pad;		/* ignored (old callers left it uninitialised) */
	__u64 addr;		/* start address, in the calling process */
	__u64 reserved_bits;	/* ignored */
};

/* Argument of KSM_START_STOP_KTHREAD and KSM_GET_INFO_KTHREAD. 24 bytes. */
struct ksm_kthread_info {
	__u32 sleep;		/* microseconds to sleep between batches */
	__u32 pages_to_scan;	/* pages scanned per batch */
	__u32 flags;		/* ksm_control_flags_run */
	__u32 pad;
	__u64 reserved_bits;
};

#define KSMIO 0xAB

/* ioctls on /dev/ksm itself */
#define KSM_GET_API_VERSION		_IO(KSMIO, 0x00)	/* returns KSM_API_VERSION */
#define KSM_CREATE_SHARED_MEMORY_AREA	_IO(KSMIO, 0x01)	/* returns a new SMA fd */
#define KSM_START_STOP_KTHREAD		_IOW(KSMIO, 0x02, struct ksm_kthread_info)
/* Encoded _IOW, yet the driver copies the structure OUT to the caller. */
#define KSM_GET_INFO_KTHREAD		_IOW(KSMIO, 0x03, struct ksm_kthread_info)

/* ioctls on a shared memory area (SMA) fd */
#define KSM_REGISTER_MEMORY_REGION	_IOW(KSMIO, 0x20, struct ksm_memory_region)
#define KSM_REMOVE_MEMORY_REGION	_IO(KSMIO, 0x21)	/* drops every region of the SMA */

#endif /* __LINUX_KSM_H */
