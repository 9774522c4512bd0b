/* SPDX-License-Identifier: MIT */
/*
 * handler.h - the fault handler thread (the coordinator's uffd reader):
 * reads every writer's uffd in fair rounds (one read of each uffd that has
 * faults per round), and for each write fault copies the old page first
 * (copy.h), then un-protects it in the faulting process (which wakes the
 * writer); then the round's copy-ahead windows, un-protected in the
 * faulting process and, with --unprotect all, in every other one.  While
 * pre-arming it only un-protects and records the page.  Its errors end the
 * run at the next coord_check().
 */
#ifndef UFFDLAB_HANDLER_H
#define UFFDLAB_HANDLER_H

#include "coord.h"

/* Start it if the strategy delivers faults to user space (uffd-wp ones). */
void handler_start(struct coord *c);
void handler_stop(struct coord *c);

#endif
