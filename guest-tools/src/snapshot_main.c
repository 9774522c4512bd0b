/* SPDX-License-Identifier: MIT */
/*
 * uffd-snapshot - multi-process uffd-wp background snapshot of guest RAM,
 * measured and verified.  This file: main().  See README.md for flags,
 * scenarios, the module layout and the JSON Lines schema.
 */
#include "options.h"
#include "plan.h"
#include "run.h"
#include "selftest.h"
#include "util.h"

#include <stdio.h>

int main(int argc, char **argv)
{
	struct opts o;
	struct plan plan;

	g_tool = SNAPSHOT_TOOL;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (parse_options(argc, argv, &o) == ACT_SELF_TEST)
		return self_test();
	if (o.dry_run) {
		/* the same decision as the run's, from the options alone */
		plan = plan_features(&o);
		plan_emit(&plan);
		return EXIT_RAN;
	}
	return run_snapshot(&o);
}
