/* SPDX-License-Identifier: MIT */
/*
 * uffd-probe - what does the running kernel offer for uffd-wp?
 *
 * Prints one JSON object (keys documented in README.md).  Every check is a
 * real attempt (open, UFFDIO_API, register, protect, read pagemap back), so
 * the answer holds for this kernel and these privileges, not for the headers.
 */
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct wp_result {
	int state;            /* 1 works, 0 does not, -1 not applicable (null) */
	char reason[200];
};

static void set_reason(struct wp_result *r, int state, const char *fmt, int err)
{
	r->state = state;
	snprintf(r->reason, sizeof(r->reason), fmt, strerror(err), err);
}

/*
 * Register `len` bytes at `p` for WP with a fresh uffd, protect the first
 * page and check pagemap bit 57 reports it.  `p` must be populated.
 */
static void try_wp(enum uffd_source src, void *p, size_t len, uint64_t features,
		   struct wp_result *r)
{
	uint64_t ioctls = 0;
	int fd, ret;
	long wp;

	fd = uffd_open(src);
	if (fd < 0) {
		set_reason(r, 0, "userfaultfd open failed: %s (errno %d)", -fd);
		return;
	}
	ret = uffd_api(fd, features, NULL, NULL);
	if (ret) {
		set_reason(r, 0, "UFFDIO_API failed: %s (errno %d)", -ret);
		goto out;
	}
	ret = uffd_register(fd, p, len, UFFDIO_REGISTER_MODE_WP, &ioctls);
	if (ret) {
		set_reason(r, 0, "UFFDIO_REGISTER(MODE_WP) failed: %s (errno %d)", -ret);
		goto out;
	}
	if (!(ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
		r->state = 0;
		snprintf(r->reason, sizeof(r->reason),
			 "registered, but UFFDIO_WRITEPROTECT not offered on this range");
		goto out;
	}
	ret = uffd_wp(fd, (uintptr_t)p, len, true, false);
	if (ret) {
		set_reason(r, 0, "UFFDIO_WRITEPROTECT failed: %s (errno %d)", -ret);
		goto out;
	}
	wp = pagemap_count_wp(0, (uintptr_t)p, len, len);
	if (wp < 0) {
		set_reason(r, 0, "reading /proc/self/pagemap failed: %s (errno %d)", (int)-wp);
		goto out;
	}
	if (wp == 0) {
		r->state = 0;
		snprintf(r->reason, sizeof(r->reason),
			 "protected, but pagemap bit 57 (PM_UFFD_WP) is not set");
		goto out;
	}
	r->state = 1;
out:
	close(fd);
}

/* Map `fd` shared, touch it, run try_wp. */
static void try_wp_fd(enum uffd_source src, int fd, size_t len, uint64_t feat,
		      struct wp_result *r)
{
	void *p;

	if (ftruncate(fd, (off_t)len)) {
		set_reason(r, 0, "ftruncate failed: %s (errno %d)", errno);
		return;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		set_reason(r, 0, "mmap failed: %s (errno %d)", errno);
		return;
	}
	memset(p, 1, len);
	try_wp(src, p, len, feat, r);
	munmap(p, len);
}

static void probe_memfd(enum uffd_source src, uint64_t feat, struct wp_result *r)
{
	int fd = memfd_create("uffd-probe", MFD_CLOEXEC);

	if (fd < 0) {
		set_reason(r, 0, "memfd_create failed: %s (errno %d)", errno);
		return;
	}
	try_wp_fd(src, fd, (size_t)sysconf(_SC_PAGESIZE), feat, r);
	close(fd);
}

static void probe_shmem(enum uffd_source src, uint64_t feat, struct wp_result *r)
{
	char path[64];
	int fd;

	snprintf(path, sizeof(path), "/dev/shm/uffd-probe-%d", (int)getpid());
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0) {
		set_reason(r, -1, "cannot create a file in /dev/shm: %s (errno %d)", errno);
		return;
	}
	unlink(path);
	try_wp_fd(src, fd, (size_t)sysconf(_SC_PAGESIZE), feat, r);
	close(fd);
}

static void probe_hugetlbfs(enum uffd_source src, uint64_t feat, struct wp_result *r)
{
	long free_hp = meminfo_value("HugePages_Free");
	long hp_kb = meminfo_value("Hugepagesize");
	int fd;

	if (free_hp <= 0 || hp_kb <= 0) {
		r->state = -1;
		snprintf(r->reason, sizeof(r->reason),
			 "no free huge pages (HugePages_Free=%ld); set vm.nr_hugepages",
			 free_hp);
		return;
	}
	fd = memfd_create("uffd-probe-huge", MFD_CLOEXEC | MFD_HUGETLB);
	if (fd < 0) {
		set_reason(r, -1, "memfd_create(MFD_HUGETLB) failed: %s (errno %d)", errno);
		return;
	}
	try_wp_fd(src, fd, (size_t)hp_kb * 1024, feat, r);
	close(fd);
}

static void probe_anon(enum uffd_source src, struct wp_result *r)
{
	size_t len = (size_t)sysconf(_SC_PAGESIZE);
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		set_reason(r, 0, "mmap failed: %s (errno %d)", errno);
		return;
	}
	memset(p, 1, len);
	try_wp(src, p, len, 0, r);
	munmap(p, len);
}

/* UFFDIO_MOVE (6.8) is offered as a range ioctl of a MISSING registration. */
static bool probe_move(enum uffd_source src, uint64_t offered)
{
	size_t len = (size_t)sysconf(_SC_PAGESIZE);
	uint64_t ioctls = 0;
	bool ok = false;
	void *p;
	int fd;

	if (!(offered & UFFD_FEATURE_MOVE))
		return false;
	fd = uffd_open(src);
	if (fd < 0)
		return false;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p != MAP_FAILED) {
		if (!uffd_api(fd, UFFD_FEATURE_MOVE, NULL, NULL) &&
		    !uffd_register(fd, p, len, UFFDIO_REGISTER_MODE_MISSING, &ioctls))
			ok = (ioctls & (1ULL << _UFFDIO_MOVE)) != 0;
		munmap(p, len);
	}
	close(fd);
	return ok;
}

static void emit_wp(struct json *j, const char *name, const struct wp_result *r)
{
	if (r->state < 0)
		j_null(j, name);
	else
		j_bool(j, name, r->state == 1);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: uffd-probe [--help]\n"
		"Prints one JSON object describing the running kernel's userfaultfd\n"
		"write-protect support (see guest-tools/README.md).\n");
}

int main(int argc, char **argv)
{
	struct wp_result memfd = { 0 }, shmem = { 0 }, huge = { 0 }, anon = { 0 };
	uint64_t offered = 0, file_feat = 0;
	enum uffd_source src = UFFD_SRC_SYSCALL;
	int sys_err, dev_err = 0, uo_fd, ret;
	bool dev_present, have_api = false;
	long unpriv, hp_kb;
	char raw[32];
	struct json j;

	g_tool = "uffd-probe";
	if (argc > 1) {
		if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
			usage();
			return 0;
		}
		die_usage(argv[1], "unknown argument '%s': uffd-probe takes no arguments", argv[1]);
	}

	/* Which ways of getting a uffd work here? */
	ret = uffd_open(UFFD_SRC_SYSCALL);
	sys_err = ret < 0 ? -ret : 0;
	if (ret >= 0)
		close(ret);
	uo_fd = uffd_open(UFFD_SRC_SYSCALL_USER_ONLY);
	if (uo_fd >= 0)
		close(uo_fd);
	dev_present = access("/dev/userfaultfd", F_OK) == 0;
	ret = uffd_open(UFFD_SRC_DEV);
	if (ret >= 0)
		close(ret);
	else
		dev_err = -ret;
	if (sys_err && !dev_err)
		src = UFFD_SRC_DEV;
	else if (sys_err && uo_fd >= 0)
		src = UFFD_SRC_SYSCALL_USER_ONLY;

	ret = uffd_query_features(src, &offered, NULL);
	have_api = ret == 0;
	if (have_api && (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
		file_feat = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

	if (have_api) {
		probe_memfd(src, file_feat, &memfd);
		probe_shmem(src, file_feat, &shmem);
		probe_hugetlbfs(src, file_feat, &huge);
		probe_anon(src, &anon);
	} else {
		const char *why = "no usable userfaultfd";

		memfd.state = shmem.state = huge.state = anon.state = 0;
		snprintf(memfd.reason, sizeof(memfd.reason), "%s", why);
		snprintf(shmem.reason, sizeof(shmem.reason), "%s", why);
		snprintf(huge.reason, sizeof(huge.reason), "%s", why);
		snprintf(anon.reason, sizeof(anon.reason), "%s", why);
	}

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "probe");
	j_str(&j, "tool", "uffd-probe");
	j_int(&j, "version", 1);
	j_str(&j, "kernel", kernel_release());
	j_int(&j, "page_size", sysconf(_SC_PAGESIZE));
	j_str(&j, "uffd_source", have_api ? uffd_source_names[src] : NULL);
	j_bool(&j, "syscall_userfaultfd", sys_err == 0);
	j_str(&j, "syscall_error", sys_err ? strerror(sys_err) : NULL);
	j_bool(&j, "user_mode_only", uo_fd >= 0);
	j_bool(&j, "dev_userfaultfd", dev_present && dev_err == 0);
	j_bool(&j, "dev_userfaultfd_present", dev_present);
	j_str(&j, "dev_userfaultfd_error", dev_err ? strerror(dev_err) : NULL);
	if (read_long_file("/proc/sys/vm/unprivileged_userfaultfd", &unpriv))
		j_int(&j, "unprivileged_userfaultfd", unpriv);
	else
		j_null(&j, "unprivileged_userfaultfd");
	j_bool(&j, "api", have_api);
	snprintf(raw, sizeof(raw), "0x%llx", (unsigned long long)offered);
	j_str(&j, "features_raw", raw);

	j_obj_open(&j, "features");
	for (size_t i = 0; i < uffd_nfeatures; i++)
		j_bool(&j, uffd_features[i].name, (offered & uffd_features[i].bit) != 0);
	j_obj_close(&j);
	{
		uint64_t known = 0;

		for (size_t i = 0; i < uffd_nfeatures; i++)
			known |= uffd_features[i].bit;
		snprintf(raw, sizeof(raw), "0x%llx", (unsigned long long)(offered & ~known));
		j_str(&j, "features_unknown_bits", raw);
	}
	j_obj_open(&j, "feature_min_kernel");
	for (size_t i = 0; i < uffd_nfeatures; i++)
		j_str(&j, uffd_features[i].name, uffd_features[i].min_kernel);
	j_obj_close(&j);

	j_obj_open(&j, "wp_register");
	emit_wp(&j, "memfd", &memfd);
	emit_wp(&j, "shmem", &shmem);
	emit_wp(&j, "hugetlbfs", &huge);
	emit_wp(&j, "anon", &anon);
	j_obj_close(&j);
	j_obj_open(&j, "wp_register_reason");
	if (memfd.state != 1) j_str(&j, "memfd", memfd.reason);
	if (shmem.state != 1) j_str(&j, "shmem", shmem.reason);
	if (huge.state != 1) j_str(&j, "hugetlbfs", huge.reason);
	if (anon.state != 1) j_str(&j, "anon", anon.reason);
	j_obj_close(&j);

	j_bool(&j, "pagemap_scan", pagemap_scan_supported());
	j_bool(&j, "uffdio_move", have_api && probe_move(src, offered));
	j_int(&j, "hugepages_free", meminfo_value("HugePages_Free"));
	hp_kb = meminfo_value("Hugepagesize");
	j_int(&j, "hugepage_size_kb", hp_kb);
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
	return 0;
}
