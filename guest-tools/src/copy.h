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

#define COPY_CHUNK_BYTES (2u << 20)   /* progress, and --release chunk, every 2 MiB */

/* Copy pages [first, first+n) with no claim: nobody else copies them. */
void copy_pages(struct coord *c, uint64_t first, uint64_t n);

/* Handler side: page p is in the snapshot when this returns. */
void copy_page_claimed(struct coord *c, uint64_t p);

/* All of RAM while faults may race (uffd-wp strategies); with --release
 * chunk, un-protect every copied chunk in every process. */
void copy_all_claimed(struct coord *c);

/* All of RAM, nobody else copying (stop-the-world, async-scan). */
void copy_all_plain(struct coord *c);

#endif
