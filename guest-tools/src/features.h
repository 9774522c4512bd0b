/* SPDX-License-Identifier: MIT */
/*
 * features.h - what the kernel can offer the tools, and the first mainline
 * release that offers it: the one table.
 *
 * uffd.c builds its feature table from UFFDLAB_FEATURES, and the host
 * (uffdlab/scenarios.py) reads this file to say which Linux release a
 * scenario needs. So keep every row an X(NAME, BIT, "RELEASE") or
 * X(NAME, "RELEASE") on a line of its own.
 */
#ifndef UFFDLAB_FEATURES_H
#define UFFDLAB_FEATURES_H

/* uffd feature bits (UFFD_FEATURE_<NAME>, linux/userfaultfd.h) */
#define UFFDLAB_FEATURES(X) \
	X(PAGEFAULT_FLAG_WP, UFFD_FEATURE_PAGEFAULT_FLAG_WP, "5.7") \
	X(EVENT_FORK, UFFD_FEATURE_EVENT_FORK, "4.11") \
	X(EVENT_REMAP, UFFD_FEATURE_EVENT_REMAP, "4.11") \
	X(EVENT_REMOVE, UFFD_FEATURE_EVENT_REMOVE, "4.11") \
	X(MISSING_HUGETLBFS, UFFD_FEATURE_MISSING_HUGETLBFS, "4.11") \
	X(MISSING_SHMEM, UFFD_FEATURE_MISSING_SHMEM, "4.11") \
	X(EVENT_UNMAP, UFFD_FEATURE_EVENT_UNMAP, "4.11") \
	X(SIGBUS, UFFD_FEATURE_SIGBUS, "4.14") \
	X(THREAD_ID, UFFD_FEATURE_THREAD_ID, "4.14") \
	X(MINOR_HUGETLBFS, UFFD_FEATURE_MINOR_HUGETLBFS, "5.13") \
	X(MINOR_SHMEM, UFFD_FEATURE_MINOR_SHMEM, "5.14") \
	X(EXACT_ADDRESS, UFFD_FEATURE_EXACT_ADDRESS, "5.18") \
	X(WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "5.19") \
	X(WP_UNPOPULATED, UFFD_FEATURE_WP_UNPOPULATED, "6.4") \
	X(POISON, UFFD_FEATURE_POISON, "6.6") \
	X(WP_ASYNC, UFFD_FEATURE_WP_ASYNC, "6.7") \
	X(MOVE, UFFD_FEATURE_MOVE, "6.8")

/* what is not a feature bit: a syscall flag, a device, an ioctl */
#define UFFDLAB_CAPS(X) \
	X(USER_MODE_ONLY, "5.11") \
	X(DEV_USERFAULTFD, "6.1") \
	X(PAGEMAP_SCAN, "6.7")

#endif
