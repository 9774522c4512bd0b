/* SPDX-License-Identifier: MIT */
/* plan.c - see plan.h */
#include "plan.h"
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define NEED_FEATURE_ROW(name, bit, release) [NEED_##name] = { #name, bit, release },
#define NEED_CAP_ROW(name, release) [NEED_##name] = { #name, 0, release },
const struct need_info need_info[NEED_N] = {
	UFFDLAB_FEATURES(NEED_FEATURE_ROW)
	UFFDLAB_CAPS(NEED_CAP_ROW)
};
#undef NEED_FEATURE_ROW
#undef NEED_CAP_ROW

static void need(struct plan *p, enum need n, const char *why)
{
	p->need |= NEED_BIT(n);
	p->why[n] = why;
}

/* A feature bit the run needs and asks for in every writer's uffd. */
static void need_and_ask(struct plan *p, enum need n, const char *why)
{
	need(p, n, why);
	p->ask |= need_info[n].bit;
}

struct plan plan_features(const struct opts *o)
{
	struct plan p = { 0 };

	if (o->strategy == ST_STW)
		return p;       /* no userfaultfd at all */
	if (o->uffd_source == UFFD_SRC_SYSCALL_USER_ONLY)
		need(&p, NEED_USER_MODE_ONLY, "--uffd-source syscall-user-only");
	else if (o->uffd_source == UFFD_SRC_DEV)
		need(&p, NEED_DEV_USERFAULTFD, "--uffd-source devuserfaultfd");
	if (o->backing == B_ANON) {
		need(&p, NEED_PAGEFAULT_FLAG_WP, "uffd-wp on anonymous memory");
		need_and_ask(&p, NEED_THREAD_ID, "mapping faults to writer threads");
		if (!o->prefill && !o->populate)
			need(&p, NEED_WP_UNPOPULATED, "protecting never-touched anonymous pages "
			     "(--prefill no --populate no)");
		p.ask_if_offered |= need_info[NEED_WP_UNPOPULATED].bit;
	} else {
		need_and_ask(&p, NEED_WP_HUGETLBFS_SHMEM,
			     "uffd-wp on shmem/memfd/hugetlbfs (PTE markers)");
	}
	if (o->strategy == ST_ASYNC) {
		need_and_ask(&p, NEED_WP_ASYNC, "--strategy async-scan");
		need(&p, NEED_PAGEMAP_SCAN, "--strategy async-scan");
	}
	return p;
}

/* Compare dotted releases numerically: "5.19" > "5.7". */
static int release_cmp(const char *a, const char *b)
{
	while (*a || *b) {
		char *ea, *eb;
		unsigned long x = strtoul(a, &ea, 10), y = strtoul(b, &eb, 10);

		if (x != y)
			return x < y ? -1 : 1;
		a = *ea == '.' ? ea + 1 : ea;
		b = *eb == '.' ? eb + 1 : eb;
	}
	return 0;
}

const char *plan_first_kernel(const struct plan *p)
{
	const char *first = NULL;

	for (int n = 0; n < NEED_N; n++)
		if (plan_needs(p, n) && (!first || release_cmp(need_info[n].release, first) > 0))
			first = need_info[n].release;
	return first ? first : "any";
}

void plan_emit(const struct plan *p)
{
	int order[NEED_N], count = 0;
	struct json j;

	/* by name: insertion sort of the needs */
	for (int n = 0; n < NEED_N; n++) {
		const char *name = need_info[n].name;
		int k;

		if (!plan_needs(p, n))
			continue;
		for (k = count++; k > 0 && strcmp(need_info[order[k - 1]].name, name) > 0; k--)
			order[k] = order[k - 1];
		order[k] = n;
	}
	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "plan");
	j_str(&j, "tool", SNAPSHOT_TOOL);
	j_int(&j, "version", SNAPSHOT_VERSION);
	j_arr_open(&j, "features");
	for (int k = 0; k < count; k++)
		j_str(&j, NULL, need_info[order[k]].name);
	j_arr_close(&j);
	j_str(&j, "first_kernel", plan_first_kernel(p));
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
}

/* What the running kernel offers through a uffd from src; exit 2 or 3 if none. */
static void query_kernel(enum uffd_source src, uint64_t *offered)
{
	int ret = uffd_query_features(src, offered, NULL);

	if (ret == -ENOENT && src == UFFD_SRC_DEV)
		die_unsupported("/dev/userfaultfd", need_info[NEED_DEV_USERFAULTFD].release, NULL,
				"/dev/userfaultfd needs Linux %s (running %s); try --uffd-source syscall",
				need_info[NEED_DEV_USERFAULTFD].release, kernel_release());
	if (ret == -EINVAL && src == UFFD_SRC_SYSCALL_USER_ONLY)
		die_unsupported("UFFD_USER_MODE_ONLY", need_info[NEED_USER_MODE_ONLY].release, NULL,
				"UFFD_USER_MODE_ONLY needs Linux %s (running %s)",
				need_info[NEED_USER_MODE_ONLY].release, kernel_release());
	if (ret == -ENOSYS)
		die_unsupported("userfaultfd", "4.3", NULL,
				"userfaultfd(2) is not available (CONFIG_USERFAULTFD off?) on %s",
				kernel_release());
	if (ret == -EPERM || ret == -EACCES) {
		errno = -ret;
		die_sys(src == UFFD_SRC_DEV ? "open(/dev/userfaultfd)" : "userfaultfd(2)",
			"cannot create a userfaultfd (as non-root set vm.unprivileged_userfaultfd=1, "
			"or use --uffd-source syscall-user-only or devuserfaultfd)");
	}
	if (ret) {
		errno = -ret;
		die_sys("ioctl(UFFDIO_API)", "querying userfaultfd features");
	}
}

uint64_t plan_require(const struct plan *p, enum uffd_source src, uint64_t *offered)
{
	if (!p->need) {
		if (uffd_query_features(src, offered, NULL))
			*offered = 0;
		return 0;
	}
	/* the uffd comes from src: that proves USER_MODE_ONLY or DEV_USERFAULTFD */
	query_kernel(src, offered);
	for (int n = 0; n < NEED_N; n++) {
		const struct need_info *f = &need_info[n];

		if (!plan_needs(p, n))
			continue;
		if (f->bit && !(*offered & f->bit))
			die_unsupported(f->name, f->release, p->why[n],
					"%s needs Linux %s (running %s): %s", f->name, f->release,
					kernel_release(), p->why[n]);
		if (n == NEED_PAGEMAP_SCAN && !pagemap_scan_supported())
			die_unsupported(f->name, f->release, p->why[n],
					"%s needs Linux %s (running %s): %s uses it", f->name,
					f->release, kernel_release(), p->why[n]);
	}
	return p->ask | (p->ask_if_offered & *offered);
}
