/* SPDX-License-Identifier: MIT */
/*
 * uffd.h - thin, checked wrappers around userfaultfd and pagemap.
 *
 * Wrappers that can fail in expected ways return -errno (0 on success) so
 * probes can report instead of dying; the *_or_die variants name the call
 * and errno and exit with EXIT_RUNTIME.
 */
#ifndef UFFDLAB_UFFD_H
#define UFFDLAB_UFFD_H

#include "compat.h"
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

/* One row per uffd feature bit: name without the UFFD_FEATURE_ prefix and
 * the first mainline kernel that offers it. */
struct uffd_feature_info {
	const char *name;
	uint64_t bit;
	const char *min_kernel;
};
extern const struct uffd_feature_info uffd_features[];
extern const size_t uffd_nfeatures;
const struct uffd_feature_info *uffd_feature_by_bit(uint64_t bit);

/* Where a userfaultfd comes from (--uffd-source). */
enum uffd_source {
	UFFD_SRC_SYSCALL,           /* userfaultfd(2) */
	UFFD_SRC_SYSCALL_USER_ONLY, /* userfaultfd(UFFD_USER_MODE_ONLY), 5.11 */
	UFFD_SRC_DEV,               /* /dev/userfaultfd + USERFAULTFD_IOC_NEW, 6.1 */
	UFFD_SRC_N
};
/* --uffd-source's names, as options and records spell them. */
extern const char *const uffd_source_names[UFFD_SRC_N];

/* New O_CLOEXEC|O_NONBLOCK userfaultfd; returns fd or -errno. */
int uffd_open(enum uffd_source src);
/* UFFDIO_API asking for `want`; on success *offered is what the kernel
 * supports.  Returns -EOPNOTSUPP when a wanted bit was silently dropped
 * (kernels before 6.10 did that instead of failing). */
int uffd_api(int uffd, uint64_t want, uint64_t *offered, uint64_t *ioctls);
/* Features the running kernel offers, using a throw-away uffd. */
int uffd_query_features(enum uffd_source src, uint64_t *offered, uint64_t *ioctls);

int uffd_register(int uffd, void *addr, size_t len, uint64_t mode, uint64_t *ioctls);
/* protect=true sets uffd-wp, false clears it and (unless dontwake) wakes
 * the threads blocked on the range. */
int uffd_wp(int uffd, uintptr_t addr, size_t len, bool protect, bool dontwake);
int uffd_wake(int uffd, uintptr_t addr, size_t len);
void uffd_wp_or_die(int uffd, uintptr_t addr, size_t len, bool protect,
		    bool dontwake, const char *who);

/* Count pages of [addr, addr+len) whose pagemap entry has PM_UFFD_WP
 * (bit 57) in process pid (0 = self).  Returns -errno on failure. */
long pagemap_count_wp(int pid, uintptr_t addr, size_t len, size_t page_size);

/* Does /proc/self/pagemap accept PAGEMAP_SCAN (6.7+)? */
bool pagemap_scan_supported(void);

#endif
