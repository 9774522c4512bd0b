/*
 * coord.h - the coordinator (QEMU role) of uffd-snapshot.
 *
 * coord.c: setup, writers, liveness, the fault handler thread, reports.
 * strategy.c: the snapshot strategies and the copy loops.
 */
#ifndef UFFDLAB_COORD_H
#define UFFDLAB_COORD_H

#include "snapshot.h"

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

	/* copy state per page: 0 not copied, 1 being copied, 2 copied */
	_Atomic uint8_t *pstate;
	_Atomic uint64_t copied;
	_Atomic int phase;
	uint64_t *written_at_instant;   /* !prefill: bitmap copied at the instant */

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

/* coord.c */
void coord_check(struct coord *c);                 /* liveness, timeout, handler error */
void coord_progress(struct coord *c, const char *phase, bool force);
uint64_t coord_total_ops(struct coord *c);
void coord_mem(struct coord *c, int64_t *rss, int64_t *pte);
void pause_all(struct coord *c);
void resume_all(struct coord *c);
void coord_wait_until(struct coord *c, uint64_t t, const char *phase);

/* strategy.c */
void run_strategy(struct coord *c);
void copy_page_claimed(struct coord *c, uint64_t p);
int arm_all(struct coord *c, bool protect);

#endif
