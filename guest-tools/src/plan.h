/* SPDX-License-Identifier: MIT */
/*
 * plan.h - which kernel features a run needs: the one authority, used by
 * the real run to require them and by --dry-run to print them.
 *
 * A need is a uffd feature bit or a capability that is not one (a syscall
 * flag, a device, an ioctl), named as in features.h.
 */
#ifndef UFFDLAB_PLAN_H
#define UFFDLAB_PLAN_H

#include "features.h"
#include "options.h"

#include <stdbool.h>
#include <stdint.h>

#define NEED_FEATURE_ENUM(name, bit, release) NEED_##name,
#define NEED_CAP_ENUM(name, release) NEED_##name,
enum need {
	UFFDLAB_FEATURES(NEED_FEATURE_ENUM)
	UFFDLAB_CAPS(NEED_CAP_ENUM)
	NEED_N
};
#undef NEED_FEATURE_ENUM
#undef NEED_CAP_ENUM
_Static_assert(NEED_N <= 32, "a need set is a 32-bit mask");

struct need_info {
	const char *name;       /* as in features.h: WP_ASYNC, PAGEMAP_SCAN */
	uint64_t bit;           /* UFFD_FEATURE_* bit, 0 for a capability */
	const char *release;    /* first mainline release that has it */
};
extern const struct need_info need_info[NEED_N];

struct plan {
	uint32_t need;              /* set of enum need: NEED_BIT(NEED_x) */
	const char *why[NEED_N];    /* for each need: what in the run needs it */
	uint64_t ask;               /* feature bits every writer's uffd asks for */
	uint64_t ask_if_offered;    /* ... and these, when the kernel offers them */
};

#define NEED_BIT(n) (1u << (n))

static inline bool plan_needs(const struct plan *p, enum need n)
{
	return p->need & NEED_BIT(n);
}

/* Decide from the options alone (no kernel query): pure. */
struct plan plan_features(const struct opts *o);

/* The first release that has every need: "5.19", or "any" for none. */
const char *plan_first_kernel(const struct plan *p);

/* --dry-run: one {"type":"plan",...} line on stdout. */
void plan_emit(const struct plan *p);

/*
 * The real run: query the kernel through a throw-away uffd from o's
 * --uffd-source (*offered: what it offers) and exit 2 naming the first need
 * it lacks.  Returns the features every writer's uffd asks for.  A run
 * that needs nothing (stop-the-world) only reports what is offered, if it
 * can (*offered is 0 otherwise).
 */
uint64_t plan_require(const struct plan *p, enum uffd_source src, uint64_t *offered);

#endif
