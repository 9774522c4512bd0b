/* SPDX-License-Identifier: MIT */
/*
 * coord.h - the coordinator's state (QEMU's role in uffd-snapshot) and its
 * supervision: liveness of the writers, the deadline, the fault handler's
 * error, commands to the writers, and the signals that end a run.
 */
#ifndef UFFDLAB_COORD_H
#define UFFDLAB_COORD_H

#include "ctl.h"
#include "options.h"
#include "util.h"
#include "writer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define TIMEOUT_GRACE_MS 500    /* the last-resort alarm fires this long after --timeout */

/* A process whose mm holds guest RAM and (usually) a uffd registered on it. */
struct proc {
	int id;
	pid_t pid;
	int uffd;                   /* -1: not registered */
	uintptr_t base;             /* where RAM is mapped in that process */
	int pagemap_fd;             /* async-scan: /proc/PID/pagemap */
	_Atomic uint64_t faults;        /* faults served after the instant */
	_Atomic uint64_t prearm_faults; /* faults served while pre-arming */
	_Atomic uint64_t late_faults;   /* faults after the copy completed */
	/* pre-arm: pages un-protected in this process since the last re-protect */
	pthread_mutex_t lock;
	uint32_t *dirty;
	size_t ndirty, cap;
	int64_t rss0, pte0, rss1, pte1; /* before/after populate */
	uint64_t populate_ns, populated;
};

enum phase { PH_IDLE, PH_PREARM, PH_ARMED, PH_COPIED };

/* Copy state of a page (coord.pstate). */
enum { PAGE_TODO, PAGE_COPYING, PAGE_COPIED };

struct coord {
	struct opts *o;
	struct ctl *ctl;
	size_t ctl_size;
	int fd;
	uint8_t *ram, *snap, *ref;
	size_t psz, size;
	uint64_t npages;
	uint64_t offered;           /* uffd features the kernel offers */

	int nproc;                  /* processes holding RAM (anon: 1, the coordinator) */
	struct proc proc[MAX_WRITERS];
	int npart;                  /* participants: writers (+ fork child) */
	pid_t wpid[MAX_WRITERS];
	int sock[MAX_WRITERS];
	pid_t child_pid;
	pthread_t wthread[MAX_WRITERS];
	struct wctx wctx[MAX_WRITERS];

	_Atomic uint8_t *pstate;    /* PAGE_* by page */
	_Atomic uint64_t copied;
	_Atomic int phase;
	_Atomic bool copying;       /* the bulk copy has started: the handler may copy ahead */
	uint64_t *written_at_instant;   /* !prefill: bitmap copied at the instant */
	_Atomic uint64_t *pre_punch;    /* --punch-hole: pages copied before the punch began */

	pthread_t handler;
	bool handler_running;
	int stop_efd;
	pthread_mutex_t lat_lock;
	struct hist lat;            /* fault-to-resolve, ns */
	_Atomic int herr;
	char herr_msg[512];

	uint64_t deadline;
	const char *doing;          /* phase name for timeout messages */
	uint64_t last_alive_check, next_progress;

	/* timeline (ns) */
	uint64_t t_start, t_go, t_snap0, t_instant, t_copied, t_end;
	uint64_t arm_ns, pause_ns, disarm_ns, ref_ns, inject_wait_ns, verify_ns;
	uint64_t ops_go, ops_snap0, ops_copied;
	bool inject_timeout;

	/* async-scan */
	int rounds;
	uint64_t dirty_round[LIM_SCAN_ROUNDS_MAX];
	uint64_t final_dirty;
	uint64_t *scan_bits;

	/* writer memory (sums over writer processes, kB) */
	int64_t rss_snap0, pte_snap0, rss_snap1, pte_snap1;
};

/*
 * From here on no writer outlives the coordinator: a fatal error kills
 * them (cleanup hook), and so do SIGINT, SIGTERM, SIGHUP and the hard
 * timeout (--timeout + TIMEOUT_GRACE_MS), which print the one error record.
 */
void coord_guard(struct coord *c);
void coord_unguard(void);

/* Liveness (every 2 ms; set last_alive_check = 0 for now), deadline and
 * the handler's error: exits 3 naming what went wrong. */
void coord_check(struct coord *c);

uint64_t coord_total_ops(struct coord *c);      /* page writes of all participants */
uint64_t coord_total_faults(struct coord *c);   /* faults served after the instant */
void coord_mem(struct coord *c, int64_t *rss, int64_t *pte);   /* writers' VmRSS, VmPTE */

/* Commands: pause_all() returns once every participant is paused. */
void pause_all(struct coord *c);
void resume_all(struct coord *c);
void stop_all(struct coord *c);

#endif
