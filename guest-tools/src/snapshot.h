/*
 * snapshot.h - shared definitions of uffd-snapshot.
 *
 * Roles: the coordinator (QEMU's role) owns the guest-RAM backing, the
 * snapshot buffer and the fault handler thread; writers (vhost-user-backend
 * role) are separate processes that map the RAM MAP_SHARED, register their
 * own uffd and hand it to the coordinator over SCM_RIGHTS.  Coordinator and
 * writers talk through `struct ctl`, a MAP_SHARED anonymous page block
 * created before fork: commands go one way through a futex word, per-writer
 * counters come back in per-writer cache-line slots.
 */
#ifndef UFFDLAB_SNAPSHOT_H
#define UFFDLAB_SNAPSHOT_H

#include "limits.h"
#include "stamp.h"
#include "uffd.h"
#include "util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define MAX_WRITERS LIM_WRITERS_MAX
#define MAX_PART (MAX_WRITERS + 1)     /* writers + an optional fork child */
_Static_assert(MAX_PART == STAMP_SLOTS, "one stamp slot per participant");
_Static_assert(LIM_UNREGISTERED_MAX == LIM_WRITERS_MAX, "any writer may be unregistered");
#define STALL_NS 10000                 /* an op slower than 10 us counts as a stall */
#define INJECT_PAGES 16                /* pages touched by --punch-hole / --zap-after-arm */
#define TIMEOUT_GRACE_MS 500           /* the last-resort alarm fires this long after --timeout */

enum strategy { ST_STW, ST_WP, ST_WP_STAGGERED, ST_ASYNC };
enum backing { B_MEMFD, B_SHMEM, B_HUGETLBFS, B_ANON };
enum pattern { PAT_UNIFORM, PAT_SEQUENTIAL, PAT_HOT };
enum kwrite { KW_NONE, KW_READ, KW_PVW };
enum vmode { V_OFF, V_STAMP, V_COPY };

struct opts {
	enum strategy strategy;
	enum backing backing;
	uint64_t size;
	int writers;
	enum pattern pattern;
	double hot_fraction;
	double rate;            /* combined page writes/s of all writers; 0 = max */
	double duration, warmup, timeout;
	bool populate, prefill, prearm;
	int unregistered;
	bool fd_writes, punch_hole, fork_child, zap_after_arm;
	enum kwrite kernel_writes;
	enum uffd_source uffd_source;
	enum vmode verify;
	uint64_t seed;
	uint64_t corrupt;       /* --corrupt-snapshot N (verifier self-check) */
	int progress_ms;
	double stagger_ms;
	int scan_rounds;
	bool unprotect_all;      /* --unprotect all|faulting */
	bool release_chunks;     /* --release chunk|end */
	/* decided by the coordinator, not a flag: */
	uint64_t uffd_features;  /* UFFDIO_API features every writer uffd asks for */
};

const char *strategy_name(enum strategy s);
const char *backing_name(enum backing b);
const char *pattern_name(enum pattern p);
const char *kwrite_name(enum kwrite k);
const char *vmode_name(enum vmode v);

/* ---- shared control block ---- */

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

/* What a writer process tells the coordinator once it is set up. */
struct hello {
	int32_t id, pid, child_pid;
	int32_t ok, exit_code;              /* ok=0: setup failed with exit_code */
	uint64_t ram_base;
	uint64_t populate_ns, populated_pages;
	int64_t rss_kb0, pte_kb0, rss_kb1, pte_kb1;   /* before/after populate */
	char msg[384];
};

/* Everything a writer (process or thread) needs. */
struct wctx {
	const struct opts *o;
	struct ctl *ctl;
	int id;                  /* participant id: 0..writers-1, writers = fork child */
	enum role role;
	uint8_t *ram;
	size_t psz;
	uint64_t npages;
	int fd;                  /* backing fd (-1 for anon) */
	uint64_t rng;
	uint64_t cursor;         /* sequential pattern */
	pid_t child;             /* writer 0's fork child */
	int pipefd[2];           /* --kernel-writes read */
};

/* coord.c: the whole run; selftest.c: --self-test */
int coord_run(struct opts *o);
int self_test(void);

/* writer.c */
void writer_loop(struct wctx *w);
__attribute__((noreturn))
void writer_process(const struct opts *o, struct ctl *ctl, int id, int fd,
		    int sock, size_t psz, uint64_t npages, pid_t coordinator);
void futex_wake_all(_Atomic uint32_t *addr);

#endif
