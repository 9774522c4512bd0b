/* SPDX-License-Identifier: MIT */
/* uffd.c - see uffd.h */
#include "uffd.h"
#include "features.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FEATURE_ROW(name, bit, first) { #name, bit, first },
const struct uffd_feature_info uffd_features[] = {
	UFFDLAB_FEATURES(FEATURE_ROW)
};
#undef FEATURE_ROW
const size_t uffd_nfeatures = ARRAY_SIZE(uffd_features);

const struct uffd_feature_info *uffd_feature_by_bit(uint64_t bit)
{
	for (size_t i = 0; i < uffd_nfeatures; i++)
		if (uffd_features[i].bit == bit)
			return &uffd_features[i];
	return NULL;
}

const char *const uffd_source_names[UFFD_SRC_N] = {
	[UFFD_SRC_SYSCALL] = "syscall",
	[UFFD_SRC_SYSCALL_USER_ONLY] = "syscall-user-only",
	[UFFD_SRC_DEV] = "devuserfaultfd",
};

int uffd_open(enum uffd_source src)
{
	int flags = O_CLOEXEC | O_NONBLOCK;
	int fd, dev;

	switch (src) {
	case UFFD_SRC_N:
		break;
	case UFFD_SRC_SYSCALL:
	case UFFD_SRC_SYSCALL_USER_ONLY:
		if (src == UFFD_SRC_SYSCALL_USER_ONLY)
			flags |= UFFD_USER_MODE_ONLY;
		fd = (int)syscall(SYS_userfaultfd, flags);
		return fd < 0 ? -errno : fd;
	case UFFD_SRC_DEV:
		dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			return -errno;
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		if (fd < 0)
			fd = -errno;
		close(dev);
		return fd;
	}
	return -EINVAL;
}

int uffd_api(int uffd, uint64_t want, uint64_t *offered, uint64_t *ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = want };

	if (ioctl(uffd, UFFDIO_API, &api))
		return -errno;
	if (offered)
		*offered = api.features;
	if (ioctls)
		*ioctls = api.ioctls;
	/* Before 6.10 unknown bits were dropped silently: check the answer. */
	if (want & ~api.features)
		return -EOPNOTSUPP;
	return 0;
}

int uffd_query_features(enum uffd_source src, uint64_t *offered, uint64_t *ioctls)
{
	int fd = uffd_open(src), ret;

	if (fd < 0)
		return fd;
	ret = uffd_api(fd, 0, offered, ioctls);
	close(fd);
	return ret;
}

int uffd_register(int uffd, void *addr, size_t len, uint64_t mode, uint64_t *ioctls)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = mode,
	};

	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		return -errno;
	if (ioctls)
		*ioctls = reg.ioctls;
	return 0;
}

int uffd_wp(int uffd, uintptr_t addr, size_t len, bool protect, bool dontwake)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = addr, .len = len },
		.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
			(dontwake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0),
	};
	int tries = 0;

	/* EAGAIN: the mm is changing under us (fork/mremap); retry briefly. */
	while (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)) {
		if (errno != EAGAIN || ++tries > 1000)
			return -errno;
		sched_yield();
	}
	return 0;
}

int uffd_wake(int uffd, uintptr_t addr, size_t len)
{
	struct uffdio_range r = { .start = addr, .len = len };

	return ioctl(uffd, UFFDIO_WAKE, &r) ? -errno : 0;
}

void uffd_wp_or_die(int uffd, uintptr_t addr, size_t len, bool protect,
		    bool dontwake, const char *who)
{
	int ret = uffd_wp(uffd, addr, len, protect, dontwake);

	if (ret) {
		errno = -ret;
		die_sys("ioctl(UFFDIO_WRITEPROTECT)", "%s %s [0x%lx, +%zu)",
			protect ? "protecting" : "un-protecting", who,
			(unsigned long)addr, len);
	}
}

long pagemap_count_wp(int pid, uintptr_t addr, size_t len, size_t page_size)
{
	char path[64];
	size_t n = len / page_size, done = 0;
	long count = 0;
	uint64_t ent[512];
	int fd;

	if (pid)
		snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	else
		snprintf(path, sizeof(path), "/proc/self/pagemap");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	/* pagemap has one entry per base page; for huge pages look at the
	 * first base page of each. */
	while (done < n) {
		uintptr_t va = addr + done * page_size;
		off_t off = (off_t)(va / (uintptr_t)sysconf(_SC_PAGESIZE)) * 8;
		ssize_t r = pread(fd, ent, 8, off);

		if (r != 8) {
			long err = r < 0 ? -errno : -EIO;

			close(fd);
			return err;
		}
		if (ent[0] & (1ULL << PM_UFFD_WP_BIT))
			count++;
		done++;
	}
	close(fd);
	return count;
}

bool pagemap_scan_supported(void)
{
	long psz = sysconf(_SC_PAGESIZE);
	struct page_region vec[4];
	struct pm_scan_arg arg;
	bool ok;
	char *p;
	int fd;

	p = mmap(NULL, (size_t)psz * 4, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return false;
	p[0] = 1;
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		munmap(p, (size_t)psz * 4);
		return false;
	}
	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	arg.start = (uintptr_t)p;
	arg.end = (uintptr_t)p + (uintptr_t)psz * 4;
	arg.vec = (uintptr_t)vec;
	arg.vec_len = 4;
	arg.category_anyof_mask = PAGE_IS_PRESENT;
	arg.return_mask = PAGE_IS_PRESENT;
	ok = ioctl(fd, PAGEMAP_SCAN, &arg) >= 0;
	close(fd);
	munmap(p, (size_t)psz * 4);
	return ok;
}
