/* SPDX-License-Identifier: MIT */
/*
 * ctl.h - the control block shared by the coordinator and its writers.
 *
 * A MAP_SHARED anonymous block created before fork: commands go one way
 * through a futex word, each participant's counters come back in its own
 * cache-line slot.  Each writer process also sends one hello, with its uffd
 * (SCM_RIGHTS), over its own SOCK_SEQPACKET socket.
 */
#ifndef UFFDLAB_CTL_H
#define UFFDLAB_CTL_H

#include "limits.h"
#include "stamp.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define MAX_WRITERS LIM_WRITERS_MAX
#define MAX_PART (MAX_WRITERS + 1)     /* writers + an optional fork child */
_Static_assert(MAX_PART == STAMP_SLOTS, "one stamp slot per participant");
_Static_assert(LIM_UNREGISTERED_MAX == LIM_WRITERS_MAX, "any writer may be unregistered");

#define CMD_POLL_NS 100000000ULL       /* a waiting writer re-reads the command this often */

enum cmd { CMD_SETUP, CMD_RUN, CMD_PAUSE, CMD_STOP };
enum slot_state { SLOT_EMPTY, SLOT_READY, SLOT_RUNNING, SLOT_DONE, SLOT_FAILED };

/* Written by one participant, read by the coordinator. */
struct slot {
	_Alignas(64) _Atomic uint32_t state;
	_Atomic uint32_t pause_ack;        /* last pause_seq acknowledged */
	_Atomic uint64_t ops;              /* page writes done */
	_Atomic uint64_t post_ops;         /* writes attempted after the instant */
	_Atomic uint64_t op_start_ns;      /* start of the write in progress */
	_Atomic int32_t pid, tid;
	_Atomic uint32_t inject_done;      /* one-shot injection (punch, zap) finished */
	_Atomic uint32_t punch_started;    /* --punch-hole: set just before fallocate() */
	/* final statistics, valid once state is DONE */
	uint64_t stall_max_ns, stall_total_ns, stall_count;
	uint64_t pause_max_ns, pause_total_ns;
	uint64_t kw_attempted, kw_ok, kw_efault;
	uint64_t punch_first, punch_pages;
	uint64_t zap_first;
	int64_t zap_pages, zap_wp_before, zap_wp_after;
	char error[256];
};

struct ctl {
	_Alignas(64) _Atomic uint32_t cmd_gen;  /* futex word: bumped on every command */
	_Atomic uint32_t cmd;
	_Atomic uint32_t pause_seq;
	_Atomic uint32_t epoch;                 /* 0 before the instant, 1 after */
	_Atomic uint64_t ref_ns;                /* verifier copy inside this pause (not a stall) */
	struct slot slot[MAX_PART];
	_Atomic uint64_t written[];             /* !prefill: pages written so far (bitmap) */
};

/* The block's size with a written-pages bitmap for npages pages. */
size_t ctl_size(uint64_t npages);

/* Coordinator: publish cmd and wake every participant waiting for one. */
void ctl_command(struct ctl *ctl, enum cmd cmd);
/* Coordinator: a new pause (CMD_PAUSE); returns the sequence number that
 * every participant acknowledges in its slot's pause_ack. */
uint32_t ctl_pause(struct ctl *ctl);
bool ctl_all_paused(struct ctl *ctl, int npart, uint32_t seq);

/* Participant: sleep until cmd_gen moves from gen, at most timeout_ns. */
void ctl_wait(struct ctl *ctl, uint32_t gen, uint64_t timeout_ns);

/* What a writer process tells the coordinator once it is set up. */
struct hello {
	int32_t id, pid, child_pid;
	int32_t ok, exit_code;              /* ok=0: setup failed with exit_code */
	uint64_t ram_base;
	uint64_t populate_ns, populated_pages;
	int64_t rss_kb0, pte_kb0, rss_kb1, pte_kb1;   /* before/after populate */
	char msg[384];
};

/* Send a hello with fd attached (none if fd < 0).  0 or -errno. */
int hello_send(int sock, const struct hello *h, int fd);
/* Receive one; *fd is the attached fd (O_CLOEXEC) or -1.  Returns what
 * recvmsg(2) returned: sizeof(*h) when a whole hello came. */
ssize_t hello_recv(int sock, struct hello *h, int *fd);

#endif
