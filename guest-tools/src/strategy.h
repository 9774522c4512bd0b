/* SPDX-License-Identifier: MIT */
/*
 * strategy.h - the snapshot strategies: stop-the-world (S1), uffd-wp armed
 * while writers are paused (S2, S3), staggered arming (S4) and WP_ASYNC +
 * PAGEMAP_SCAN (S10).  Each takes the instant, copies all of RAM and leaves
 * the writers running.
 */
#ifndef UFFDLAB_STRATEGY_H
#define UFFDLAB_STRATEGY_H

#include "coord.h"

void run_strategy(struct coord *c);

#endif
