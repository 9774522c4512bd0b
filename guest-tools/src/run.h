/* SPDX-License-Identifier: MIT */
/*
 * run.h - one uffd-snapshot run, start to end: require the planned kernel
 * features, set up RAM and writers, warm up, run the strategy, keep the
 * writers going until --duration, stop them, verify, report.
 */
#ifndef UFFDLAB_RUN_H
#define UFFDLAB_RUN_H

#include "options.h"

/* Returns the exit code; fatal errors exit from where they happen. */
int run_snapshot(struct opts *o);

#endif
