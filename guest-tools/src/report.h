/* SPDX-License-Identifier: MIT */
/*
 * report.h - uffd-snapshot's JSON Lines records: one config, progress
 * records, one summary (README.md, "Output").  Errors are util.h's.
 */
#ifndef UFFDLAB_REPORT_H
#define UFFDLAB_REPORT_H

#include "coord.h"
#include "stamp.h"

#include <stdbool.h>

void report_config(struct coord *c);
/* A progress record, at most every --progress-ms unless forced. */
void report_progress(struct coord *c, const char *phase, bool force);
void report_summary(struct coord *c, const struct verify_out *v);

#endif
