/* SPDX-License-Identifier: MIT */
/*
 * copy.h - copying guest RAM into the snapshot: by the copier in order, and
 * by the fault handler for the page a writer waits on.  Each page is
 * claimed once through its copy state (coord.pstate), so the two never copy
 * the same page and a late claimer waits for the copy in progress.
 */
#ifndef UFFDLAB_COPY_H
#define UFFDLAB_COPY_H

#include "coord.h"

#include <stdint.h>

/* Copy pages [first, first+n) with no claim: nobody else copies them. */
void copy_pages(struct coord *c, uint64_t first, uint64_t n);

/* Handler side: pages [first, first+n) are in the snapshot when this
 * returns; it copies those nobody claimed and waits for the others. */
void copy_range_claimed(struct coord *c, uint64_t first, uint64_t n);

/* All of RAM while faults may race (uffd-wp strategies), --copy-run pages
 * claimed at a time; with --release chunk, un-protect every copied
 * --release-mb chunk in every process (progress is reported per chunk). */
void copy_all_claimed(struct coord *c);

/* All of RAM, nobody else copying (stop-the-world, async-scan). */
void copy_all_plain(struct coord *c);

#endif
