/* SPDX-License-Identifier: MIT */
/* run.c - see run.h */
#include "run.h"
#include "coord.h"
#include "handler.h"
#include "options.h"
#include "plan.h"
#include "report.h"
#include "setup.h"
#include "stamp.h"
#include "strategy.h"
#include "util.h"

#include <string.h>

#define WAIT_STEP_NS 1000000   /* waiting for a time: check and report every 1 ms */

/* Let the writers run until t, watching them. */
static void wait_until(struct coord *c, uint64_t t, const char *phase)
{
	c->doing = phase;
	while (now_ns() < t) {
		coord_check(c);
		report_progress(c, phase, false);
		sleep_ns(WAIT_STEP_NS);
	}
}

static void verify(struct coord *c, struct verify_out *v)
{
	struct opts *o = c->o;
	uint8_t roles[MAX_PART];
	struct verify_in in = {
		.snap = c->snap, .ref = o->verify == V_COPY ? c->ref : NULL,
		.psz = c->psz, .npages = c->npages, .prefilled = o->prefill,
		.written = c->written_at_instant, .arm_epoch = 1,
		.roles = roles, .nroles = (unsigned)c->npart,
		.staggered = o->strategy == ST_WP_STAGGERED,
		.punch_first = c->ctl->slot[0].punch_first,
		.punch_pages = c->ctl->slot[0].punch_pages,
		.pre_punch = (const uint64_t *)c->pre_punch,
	};
	uint64_t t0;

	memset(v, 0, sizeof(*v));
	if (o->verify == V_OFF)
		return;
	for (int i = 0; i < c->npart; i++)
		roles[i] = i >= o->writers ? ROLE_FORK_CHILD :
			   i >= o->writers - o->unregistered ? ROLE_UNREGISTERED :
			   ROLE_REGISTERED;
	if (o->corrupt)
		corrupt_snapshot(c->snap, c->psz, c->npages, o->corrupt);
	c->doing = "verifying";
	report_progress(c, "verify", true);
	t0 = now_ns();
	verify_snapshot(&in, v);
	c->verify_ns = now_ns() - t0;
}

int run_snapshot(struct opts *o)
{
	struct coord *c = xcalloc(1, sizeof(*c));
	struct verify_out v;
	struct plan plan;

	c->o = o;
	c->t_start = now_ns();
	c->deadline = c->t_start + (uint64_t)(o->timeout * 1e9);
	c->doing = "setting up";
	c->psz = (size_t)backing_page_size(o->backing);
	c->size = o->size;
	c->npages = c->size / c->psz;
	c->npart = o->writers + (o->fork_child ? 1 : 0);
	pthread_mutex_init(&c->lat_lock, NULL);
	hist_init(&c->lat);
	coord_guard(c);

	plan = plan_features(o);
	o->uffd_features = plan_require(&plan, o->uffd_source, &c->offered);
	setup_memory(c);
	setup_writers(c);
	report_config(c);
	handler_start(c);

	/* writers run; warm up, snapshot, keep running until --duration */
	c->t_go = now_ns();
	c->ops_go = coord_total_ops(c);
	resume_all(c);
	wait_until(c, c->t_go + (uint64_t)(o->warmup * 1e9), "warmup");
	run_strategy(c);
	report_progress(c, "copied", true);
	wait_until(c, c->t_go + (uint64_t)(o->duration * 1e9), "running");
	stop_all(c);
	handler_stop(c);
	c->t_end = now_ns();

	verify(c, &v);
	report_summary(c, &v);
	coord_unguard();
	setup_free(c);
	return EXIT_RAN;
}
