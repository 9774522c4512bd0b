/* SPDX-License-Identifier: MIT */
/*
 * strategy.c - see strategy.h.
 *
 * Every strategy defines one instant T at which all writers are paused; the
 * snapshot must equal guest RAM at T.  At T the coordinator bumps the epoch
 * so every later write carries epoch 1 (that is what the verifier reads).
 */
#include "strategy.h"
#include "coord.h"
#include "copy.h"
#include "report.h"
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define INJECT_SYNC_NS 2000000000ULL  /* wait at most 2 s for an injected write */
#define SCAN_VEC 1024                 /* PAGEMAP_SCAN regions per ioctl */
#define SCAN_ENOUGH 64                /* a rescan finding at most this many pages is the last */

/* ---- arming ---- */

struct arm_job {
	struct coord *c;
	bool protect;
	_Atomic int next;
	_Atomic int err;
	int err_proc;
};

static void *arm_worker(void *arg)
{
	struct arm_job *job = arg;
	struct coord *c = job->c;
	int i;

	while ((i = atomic_fetch_add(&job->next, 1)) < c->nproc) {
		struct proc *p = &c->proc[i];
		int ret;

		if (p->uffd < 0)
			continue;
		ret = uffd_wp(p->uffd, p->base, c->size, job->protect, false);
		if (ret && !atomic_load(&job->err)) {
			job->err_proc = i;
			atomic_store(&job->err, -ret);
		}
	}
	return NULL;
}

/* Protect (or un-protect) all of RAM in every registered process, with up
 * to one thread per CPU: the processes' page tables are independent. */
static void arm_all(struct coord *c, bool protect)
{
	struct arm_job job = { .c = c, .protect = protect };
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int nthreads = c->nproc < ncpu ? c->nproc : (int)ncpu;
	pthread_t th[MAX_WRITERS];
	uint64_t t0 = now_ns();

	if (nthreads < 1)
		nthreads = 1;
	for (int t = 1; t < nthreads; t++) {
		int ret = thread_create_nosig(&th[t], arm_worker, &job);

		if (ret) {
			errno = ret;
			die_sys("pthread_create", "starting arming thread %d", t);
		}
	}
	arm_worker(&job);
	for (int t = 1; t < nthreads; t++)
		pthread_join(th[t], NULL);
	if (atomic_load(&job.err)) {
		errno = atomic_load(&job.err);
		die_sys("ioctl(UFFDIO_WRITEPROTECT)", "%s all of guest RAM in writer %d",
			protect ? "protecting" : "un-protecting", job.err_proc);
	}
	if (protect)
		c->arm_ns += now_ns() - t0;
	else
		c->disarm_ns += now_ns() - t0;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* Re-protect the pages the handler un-protected during pre-arm.
 * Returns how many pages it re-protected. */
static uint64_t reprotect_dirty(struct coord *c)
{
	uint64_t total = 0, t0 = now_ns();

	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];
		uint32_t *pages;
		size_t n;

		if (p->uffd < 0)
			continue;
		pthread_mutex_lock(&p->lock);     /* take the list; new faults start a new one */
		pages = p->dirty;
		n = p->ndirty;
		p->dirty = NULL;
		p->ndirty = p->cap = 0;
		pthread_mutex_unlock(&p->lock);
		if (n)
			qsort(pages, n, sizeof(*pages), cmp_u32);
		for (size_t k = 0; k < n;) {
			size_t e = k + 1;

			while (e < n && pages[e] <= pages[e - 1] + 1)
				e++;
			uffd_wp_or_die(p->uffd, p->base + (uint64_t)pages[k] * c->psz,
				       ((uint64_t)pages[e - 1] - pages[k] + 1) * c->psz,
				       true, false, "pre-armed pages");
			k = e;
		}
		total += n;
		free(pages);
	}
	c->arm_ns += now_ns() - t0;
	return total;
}

/* ---- the instant ---- */

/* Writers are paused: record what the verifier needs, then move to epoch 1. */
static void take_instant(struct coord *c)
{
	struct opts *o = c->o;

	if (o->verify == V_COPY) {
		uint64_t t0 = now_ns();

		memcpy(c->ref, c->ram, c->size);
		c->ref_ns = now_ns() - t0;
		atomic_store(&c->ctl->ref_ns, c->ref_ns);   /* writers subtract it */
	}
	if (!o->prefill)
		for (uint64_t w = 0; w < bitmap_words(c->npages); w++)
			c->written_at_instant[w] = atomic_load(&c->ctl->written[w]);
	atomic_store(&c->ctl->epoch, 1);
	c->t_instant = now_ns();
}

static void timed_pause(struct coord *c, uint64_t *t0)
{
	*t0 = now_ns();
	pause_all(c);
}

static void timed_resume(struct coord *c, uint64_t t0)
{
	resume_all(c);
	c->pause_ns = now_ns() - t0 - c->ref_ns;
}

/* Injected faults must land after the instant and before the copy reaches
 * them, so that they are caught every time, not by luck: wait until each
 * injector made its first post-instant write.  Copying has not started. */
static bool injector_done(struct coord *c)
{
	struct opts *o = c->o;
	struct ctl *ctl = c->ctl;

	for (int i = o->writers - o->unregistered; i < o->writers; i++)
		if (!atomic_load(&ctl->slot[i].post_ops))
			return false;
	if (o->fork_child && !atomic_load(&ctl->slot[o->writers].post_ops))
		return false;
	if ((o->fd_writes || o->kernel_writes != KW_NONE) && !atomic_load(&ctl->slot[0].post_ops))
		return false;
	if ((o->punch_hole || o->zap_after_arm) && !atomic_load(&ctl->slot[0].inject_done))
		return false;
	return true;
}

static void wait_injectors(struct coord *c)
{
	uint64_t t0 = now_ns(), limit = t0 + INJECT_SYNC_NS;

	c->doing = "waiting for injected writes";
	while (!injector_done(c)) {
		if (now_ns() > limit) {
			c->inject_timeout = true;
			break;
		}
		coord_check(c);
		sched_yield();
	}
	c->inject_wait_ns = now_ns() - t0;
}

static void snapshot_begin(struct coord *c)
{
	c->t_snap0 = now_ns();
	c->ops_snap0 = coord_total_ops(c);
	coord_mem(c, &c->rss_snap0, &c->pte_snap0);
	report_progress(c, "snapshot-start", true);
}

static void snapshot_end(struct coord *c)
{
	c->t_copied = now_ns();
	c->ops_copied = coord_total_ops(c);
	coord_mem(c, &c->rss_snap1, &c->pte_snap1);
}

/* ---- S1: stop the world ---- */

static void strategy_stw(struct coord *c)
{
	uint64_t t0;

	snapshot_begin(c);
	timed_pause(c, &t0);
	take_instant(c);
	copy_all_plain(c);
	snapshot_end(c);
	timed_resume(c, t0);
}

/* ---- S2/S3: uffd-wp, armed in every process while writers are paused ---- */

static void strategy_wp(struct coord *c)
{
	uint64_t t0;

	snapshot_begin(c);
	if (c->o->prearm) {
		/* Protect while writers run; faults before the instant are only
		 * un-protected (and recorded), then re-protected inside the
		 * pause, where it is cheap: the writers' mms are idle, so no TLB
		 * shootdown has to reach a running CPU.  Re-protecting while
		 * writers run costs an IPI per page and feeds more faults. */
		atomic_store(&c->phase, PH_PREARM);
		c->doing = "pre-arming";
		arm_all(c, true);
	}
	timed_pause(c, &t0);
	c->doing = "arming";
	if (c->o->prearm)
		reprotect_dirty(c);
	else
		arm_all(c, true);
	take_instant(c);
	atomic_store(&c->phase, PH_ARMED);
	timed_resume(c, t0);
	wait_injectors(c);
	copy_all_claimed(c);
	snapshot_end(c);
	atomic_store(&c->phase, PH_COPIED);
	if (c->o->release == REL_END) {
		c->doing = "disarming";
		arm_all(c, false);
	}
}

/* ---- S4: arm process by process while writers keep running ---- */

static void strategy_staggered(struct coord *c)
{
	struct opts *o = c->o;
	uint64_t t0;

	snapshot_begin(c);
	timed_pause(c, &t0);
	take_instant(c);                  /* the instant the snapshot claims */
	atomic_store(&c->phase, PH_ARMED);
	timed_resume(c, t0);
	c->doing = "arming one by one";
	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];
		uint64_t a0, limit = now_ns() + INJECT_SYNC_NS;

		if (p->uffd < 0)
			continue;
		/* let this writer write unprotected first: the race made certain */
		while (!atomic_load(&c->ctl->slot[i].post_ops) && now_ns() < limit) {
			coord_check(c);
			sched_yield();
		}
		/* in short naps: the deadline bounds the stagger too */
		for (uint64_t end = now_ns() + (uint64_t)(o->stagger_ms * 1e6), t;
		     (t = now_ns()) < end;) {
			coord_check(c);
			sleep_ns(end - t < 1000000 ? end - t : 1000000);
		}
		a0 = now_ns();
		uffd_wp_or_die(p->uffd, p->base, c->size, true, false, "guest RAM (staggered)");
		c->arm_ns += now_ns() - a0;
	}
	wait_injectors(c);
	copy_all_claimed(c);
	snapshot_end(c);
	atomic_store(&c->phase, PH_COPIED);
	c->doing = "disarming";
	arm_all(c, false);
}

/* ---- S10: WP_ASYNC + PAGEMAP_SCAN iterative copy, final short pause ---- */

/* Collect pages written since the last scan in every process (and
 * write-protect them again, atomically, in the same ioctl). */
static uint64_t scan_written(struct coord *c)
{
	static struct page_region vec[SCAN_VEC];
	uint64_t count = 0;

	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];
		uint64_t start = p->base, end = p->base + c->size;

		if (p->pagemap_fd < 0)
			continue;
		while (start < end) {
			struct pm_scan_arg arg = {
				.size = sizeof(arg),
				.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
				.start = start, .end = end,
				.vec = (uintptr_t)vec, .vec_len = SCAN_VEC,
				.category_mask = PAGE_IS_WRITTEN,
				.return_mask = PAGE_IS_WRITTEN,
			};
			long n = ioctl(p->pagemap_fd, PAGEMAP_SCAN, &arg);

			if (n < 0)
				die_sys("ioctl(PAGEMAP_SCAN)",
					"scanning writer %d for written pages", i);
			for (long k = 0; k < n; k++) {
				for (uint64_t a = vec[k].start; a < vec[k].end; a += c->psz) {
					uint64_t pg = (a - p->base) / c->psz;

					if (!(c->scan_bits[pg / 64] & (1ULL << (pg % 64)))) {
						c->scan_bits[pg / 64] |= 1ULL << (pg % 64);
						count++;
					}
				}
			}
			if (arg.walk_end <= start)
				break;
			start = arg.walk_end;
		}
	}
	return count;
}

static void recopy_scanned(struct coord *c)
{
	for (uint64_t w = 0; w < bitmap_words(c->npages); w++) {
		while (c->scan_bits[w]) {
			int b = __builtin_ctzll(c->scan_bits[w]);

			c->scan_bits[w] &= c->scan_bits[w] - 1;
			copy_pages(c, w * 64 + (uint64_t)b, 1);
		}
	}
}

static void strategy_async(struct coord *c)
{
	struct opts *o = c->o;
	uint64_t t0;

	snapshot_begin(c);
	c->doing = "arming (WP_ASYNC)";
	arm_all(c, true);
	copy_all_plain(c);
	for (c->rounds = 0; c->rounds < o->scan_rounds; c->rounds++) {
		uint64_t dirty = scan_written(c);

		c->dirty_round[c->rounds] = dirty;
		recopy_scanned(c);
		coord_check(c);
		report_progress(c, "rescan", true);
		if (dirty <= SCAN_ENOUGH) {
			c->rounds++;
			break;
		}
	}
	timed_pause(c, &t0);
	c->final_dirty = scan_written(c);
	recopy_scanned(c);
	take_instant(c);
	snapshot_end(c);
	timed_resume(c, t0);
	c->doing = "disarming";
	arm_all(c, false);
}

void run_strategy(struct coord *c)
{
	switch (c->o->strategy) {
	case ST_STW:
		strategy_stw(c);
		break;
	case ST_WP:
		strategy_wp(c);
		break;
	case ST_WP_STAGGERED:
		strategy_staggered(c);
		break;
	case ST_ASYNC:
		strategy_async(c);
		break;
	case ST_N:
		break;
	}
}
