/* SPDX-License-Identifier: MIT */
/*
 * setup.h - what a run is made of: guest RAM (--backing, prefilled), the
 * pre-faulted snapshot buffer (and the verifier's reference), the shared
 * control block, and the writers: processes that each send a hello with
 * their own uffd, or with --backing anon threads on the coordinator's uffd.
 */
#ifndef UFFDLAB_SETUP_H
#define UFFDLAB_SETUP_H

#include "coord.h"

void setup_memory(struct coord *c);
/* Returns when every writer (and the fork child) waits for CMD_RUN. */
void setup_writers(struct coord *c);
/* Close and unmap what setup made, free it and c. */
void setup_free(struct coord *c);

#endif
