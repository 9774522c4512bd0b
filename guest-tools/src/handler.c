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

static void wp_checked(struct coord *c, struct proc *p, uint64_t page, bool protect,
		       bool dontwake)
{
	int ret = uffd_wp(p->uffd, p->base + page * c->psz, c->psz, protect, dontwake);

	if (ret)
		handler_error(c,
			      "ioctl(UFFDIO_WRITEPROTECT, %s) on writer %d page %llu failed: %s (errno %d)",
			      protect ? "WP" : "clear", p->id, (unsigned long long)page,
			      strerror(-ret), -ret);
}

/* Pre-arm fault: the instant has not come yet, so no copy: un-protect here
 * only and remember the page so the quiesced re-protect covers it.  The
 * page is recorded before the waiter is woken, so a writer that then
 * acknowledges a pause can't leave an unrecorded page behind. */
static void serve_prearm(struct coord *c, struct proc *p, uint64_t page)
{
	wp_checked(c, p, page, false, true);
	pthread_mutex_lock(&p->lock);
	if (p->ndirty == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : DIRTY_INITIAL;
		uint32_t *nd = realloc(p->dirty, cap * sizeof(*nd));

		if (!nd) {
			pthread_mutex_unlock(&p->lock);
			handler_error(c, "out of memory recording pre-arm faults");
			return;
		}
		p->dirty = nd;
		p->cap = cap;
	}
	p->dirty[p->ndirty++] = (uint32_t)page;
	pthread_mutex_unlock(&p->lock);
	if (uffd_wake(p->uffd, p->base + page * c->psz, c->psz))
		handler_error(c, "ioctl(UFFDIO_WAKE) on writer %d failed: %s", p->id,
			      strerror(errno));
	atomic_fetch_add(&p->prearm_faults, 1);
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

/* Snapshot fault: copy the old page first, then un-protect it in every
 * process (which wakes whoever waits on it there). */
static void serve_fault(struct coord *c, struct proc *p, const struct uffd_msg *m)
{
	uint64_t addr = m->arg.pagefault.address & ~((uint64_t)c->psz - 1);
	uint64_t page = (addr - p->base) / c->psz;
	int phase = atomic_load(&c->phase);
	int part = participant_of(c, p, m);
	uint64_t start = 0, t;

	if (addr < p->base || page >= c->npages) {
		handler_error(c, "fault at 0x%llx outside guest RAM of writer %d",
			      (unsigned long long)m->arg.pagefault.address, p->id);
		return;
	}
	if (phase == PH_PREARM) {
		serve_prearm(c, p, page);
		return;
	}
	if (part >= 0)
		start = atomic_load_explicit(&c->ctl->slot[part].op_start_ns, memory_order_acquire);
	copy_page_claimed(c, page);
	/* Wake the faulting writer first: its wait ends here. */
	wp_checked(c, p, page, false, false);
	t = now_ns();
	if (c->o->unprotect == UNPROT_ALL)  /* then the others, so they never fault on it */
		for (int i = 0; i < c->nproc; i++)
			if (&c->proc[i] != p && c->proc[i].uffd >= 0)
				wp_checked(c, &c->proc[i], page, false, false);
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
}

static void drain_uffd(struct coord *c, struct proc *p)
{
	struct uffd_msg msgs[16];

	for (;;) {
		ssize_t n = read(p->uffd, msgs, sizeof(msgs));

		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				handler_error(c, "read(uffd) of writer %d failed: %s", p->id,
					      strerror(errno));
			return;
		}
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT ||
			    !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
				handler_error(c,
					      "unexpected uffd event %u (flags 0x%llx) from writer %d",
					      msgs[i].event,
					      (unsigned long long)msgs[i].arg.pagefault.flags,
					      p->id);
				continue;
			}
			serve_fault(c, p, &msgs[i]);
		}
	}
}

static void *handler_main(void *arg)
{
	struct coord *c = arg;
	struct pollfd pfd[MAX_WRITERS + 1];
	struct proc *who[MAX_WRITERS];
	int n = 0;

	for (int i = 0; i < c->nproc; i++) {
		if (c->proc[i].uffd < 0)
			continue;
		pfd[n].fd = c->proc[i].uffd;
		pfd[n].events = POLLIN;
		who[n++] = &c->proc[i];
	}
	pfd[n].fd = c->stop_efd;
	pfd[n].events = POLLIN;
	for (;;) {
		int r = poll(pfd, (nfds_t)n + 1, HANDLER_POLL_MS);

		if (r < 0 && errno != EINTR) {
			handler_error(c, "poll on uffds failed: %s", strerror(errno));
			return NULL;
		}
		if (pfd[n].revents & POLLIN)
			return NULL;
		for (int i = 0; i < n; i++)
			if (pfd[i].revents & POLLIN)
				drain_uffd(c, who[i]);
	}
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
