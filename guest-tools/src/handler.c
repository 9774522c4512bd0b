/* SPDX-License-Identifier: MIT */
/* handler.c - see handler.h */
#include "handler.h"
#include "copy.h"
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define HANDLER_POLL_MS 100     /* the handler re-checks its stop signal this often */
#define DIRTY_INITIAL 1024      /* first size of a process's pre-arm page list */

static __attribute__((format(printf, 2, 3)))
void handler_error(struct coord *c, const char *fmt, ...)
{
	va_list ap;

	if (atomic_load(&c->herr))
		return;
	va_start(ap, fmt);
	vsnprintf(c->herr_msg, sizeof(c->herr_msg), fmt, ap);
	va_end(ap);
	atomic_store(&c->herr, 1);
}

/* Un-protect pages [first, first+n) in p's mm; without dontwake this also
 * wakes whoever waits on them there: one ioctl for both. */
static void unprotect_checked(struct coord *c, struct proc *p, uint64_t first, uint64_t n,
			      bool dontwake)
{
	int ret = uffd_wp(p->uffd, p->base + first * c->psz, n * c->psz, false, dontwake);

	/* ESRCH: that mm is gone.  A fault read before the writers stopped may
	 * be served after one of them exited (a chunk release woke it): there
	 * is nothing left to un-protect there.  A writer that dies early is
	 * caught by the coordinator's liveness checks. */
	if (ret && ret != -ESRCH)
		handler_error(c,
			      "ioctl(UFFDIO_WRITEPROTECT, clear%s) on writer %d pages %llu+%llu failed: %s (errno %d)",
			      dontwake ? ", DONTWAKE" : "", p->id, (unsigned long long)first,
			      (unsigned long long)n, strerror(-ret), -ret);
}

/* Remember a page un-protected in p before the instant, for the re-protect. */
static bool record_prearm(struct coord *c, struct proc *p, uint64_t page)
{
	pthread_mutex_lock(&p->lock);
	if (p->ndirty == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : DIRTY_INITIAL;
		uint32_t *nd = realloc(p->dirty, cap * sizeof(*nd));

		if (!nd) {
			pthread_mutex_unlock(&p->lock);
			handler_error(c, "out of memory recording pre-arm faults");
			return false;
		}
		p->dirty = nd;
		p->cap = cap;
	}
	p->dirty[p->ndirty++] = (uint32_t)page;
	pthread_mutex_unlock(&p->lock);
	return true;
}

/* Pre-arm fault: the instant has not come yet, so no copy: un-protect here
 * only and remember the page so the quiesced re-protect covers it.  The
 * page is recorded before the un-protect wakes the writer, so a writer
 * that then acknowledges a pause can't leave an unrecorded page behind. */
static void serve_prearm(struct coord *c, struct proc *p, uint64_t page)
{
	if (!record_prearm(c, p, page))
		return;
	unprotect_checked(c, p, page, 1, false);
	atomic_fetch_add(&p->prearm_faults, 1);
}

/* The window a snapshot fault on `page` copies ahead and un-protects: the
 * aligned --copy-ahead pages around it once the bulk copy runs (so that
 * neighbours' writes don't fault), only the page itself before that
 * (injected faults must still find their pages uncopied when it starts). */
static void fault_window(struct coord *c, uint64_t page, uint64_t *first, uint64_t *n)
{
	uint64_t w = atomic_load(&c->copying) ? c->o->copy_ahead : 1;

	*first = page - page % w;
	*n = *first + w <= c->npages ? w : c->npages - *first;
}

static int participant_of(struct coord *c, struct proc *p, const struct uffd_msg *m)
{
	if (c->o->backing != B_ANON)
		return p->id;
	for (int i = 0; i < c->npart; i++)
		if ((uint32_t)atomic_load(&c->ctl->slot[i].tid) == m->arg.pagefault.feat.ptid)
			return i;
	return -1;
}

/* A served fault whose window is still to do. */
struct ahead {
	struct proc *p;
	uint64_t first, n;
};

/* Snapshot fault, the part the writer waits for: copy the old page, then
 * un-protect it in the faulting process, which wakes the writer (one
 * ioctl: the latency clock stops).  Fills *a with the window still to do;
 * returns false when there is none (pre-arm, errors). */
static bool serve_fault(struct coord *c, struct proc *p, const struct uffd_msg *m,
			struct ahead *a)
{
	uint64_t addr = m->arg.pagefault.address & ~((uint64_t)c->psz - 1);
	uint64_t page = (addr - p->base) / c->psz;
	int phase = atomic_load(&c->phase);
	int part = participant_of(c, p, m);
	uint64_t start = 0, t;

	if (addr < p->base || page >= c->npages) {
		handler_error(c, "fault at 0x%llx outside guest RAM of writer %d",
			      (unsigned long long)m->arg.pagefault.address, p->id);
		return false;
	}
	if (phase == PH_PREARM) {
		serve_prearm(c, p, page);
		return false;
	}
	if (part >= 0)
		start = atomic_load_explicit(&c->ctl->slot[part].op_start_ns, memory_order_acquire);
	copy_range_claimed(c, page, 1);
	unprotect_checked(c, p, page, 1, false);
	t = now_ns();
	if (phase == PH_ARMED) {
		atomic_fetch_add(&p->faults, 1);
		if (start && t > start) {
			pthread_mutex_lock(&c->lat_lock);
			hist_add(&c->lat, t - start);
			pthread_mutex_unlock(&c->lat_lock);
		}
	} else {
		atomic_fetch_add(&p->late_faults, 1);
	}
	a->p = p;
	fault_window(c, page, &a->first, &a->n);
	return true;
}

/* After every writer of the round is woken: copy the fault's window and
 * un-protect it with one ioctl in the faulting process (without DONTWAKE:
 * a fault queued there meanwhile may wait on one of its pages) and, with
 * --unprotect all, one in every other process. */
static void serve_ahead(struct coord *c, const struct ahead *a)
{
	if (a->n > 1) {
		copy_range_claimed(c, a->first, a->n);
		unprotect_checked(c, a->p, a->first, a->n, false);
	}
	if (c->o->unprotect != UNPROT_ALL)
		return;
	for (int i = 0; i < c->nproc; i++)
		if (&c->proc[i] != a->p && c->proc[i].uffd >= 0)
			unprotect_checked(c, &c->proc[i], a->first, a->n, false);
}

#define READ_BATCH 16     /* uffd messages per read() */

/* One read of p's uffd: wake every writer it reports (serve_fault) and add
 * their windows to todo[*ntodo...]. */
static void serve_read(struct coord *c, struct proc *p, struct ahead *todo, size_t *ntodo)
{
	struct uffd_msg msgs[READ_BATCH];
	ssize_t n = read(p->uffd, msgs, sizeof(msgs));

	if (n < 0) {
		if (errno != EAGAIN && errno != EINTR)
			handler_error(c, "read(uffd) of writer %d failed: %s (errno %d)", p->id,
				      strerror(errno), errno);
		return;
	}
	for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT ||
		    !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
			handler_error(c, "unexpected uffd event %u (flags 0x%llx) from writer %d",
				      msgs[i].event,
				      (unsigned long long)msgs[i].arg.pagefault.flags, p->id);
			continue;
		}
		if (serve_fault(c, p, &msgs[i], &todo[*ntodo]))
			(*ntodo)++;
	}
}

/*
 * Each round: one read of every uffd that has faults, waking those writers,
 * then the windows of all of them, then poll again.  Reading one uffd until
 * it was empty let a writer that faults again as soon as it is woken keep
 * the handler to itself while the others waited, for tens of ms at a time
 * (docs/snapshot-engine.md, "Fair rounds").
 */
static void *handler_main(void *arg)
{
	struct coord *c = arg;
	struct pollfd pfd[MAX_WRITERS + 1];
	struct proc *who[MAX_WRITERS];
	struct ahead *todo = calloc((size_t)c->nproc * READ_BATCH, sizeof(*todo));
	int n = 0;

	if (!todo) {
		handler_error(c, "out of memory for the fault handler's windows");
		return NULL;
	}
	for (int i = 0; i < c->nproc; i++) {
		if (c->proc[i].uffd < 0)
			continue;
		pfd[n] = (struct pollfd){ .fd = c->proc[i].uffd, .events = POLLIN };
		who[n++] = &c->proc[i];
	}
	pfd[n] = (struct pollfd){ .fd = c->stop_efd, .events = POLLIN };
	for (;;) {
		int r = poll(pfd, (nfds_t)n + 1, HANDLER_POLL_MS);
		size_t ntodo = 0;

		if (r < 0 && errno != EINTR) {
			handler_error(c, "poll on uffds failed: %s (errno %d)", strerror(errno),
				      errno);
			break;
		}
		if (r <= 0)
			continue;
		if (pfd[n].revents & POLLIN)
			break;
		for (int i = 0; i < n; i++)
			if (pfd[i].revents & POLLIN)
				serve_read(c, who[i], todo, &ntodo);
		for (size_t i = 0; i < ntodo; i++)
			serve_ahead(c, &todo[i]);
	}
	free(todo);
	return NULL;
}

void handler_start(struct coord *c)
{
	int ret;

	if (c->o->strategy == ST_STW || c->o->strategy == ST_ASYNC)
		return;    /* no faults to serve: nothing, or WP_ASYNC in the kernel */
	c->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (c->stop_efd < 0)
		die_sys("eventfd", "creating the handler stop signal");
	ret = thread_create_nosig(&c->handler, handler_main, c);
	if (ret) {
		errno = ret;
		die_sys("pthread_create", "starting the fault handler thread");
	}
	c->handler_running = true;
}

void handler_stop(struct coord *c)
{
	uint64_t one = 1;

	if (!c->handler_running)
		return;
	if (write(c->stop_efd, &one, sizeof(one)) != sizeof(one))
		die_sys("write(eventfd)", "stopping the fault handler");
	pthread_join(c->handler, NULL);
	c->handler_running = false;
	close(c->stop_efd);
}
