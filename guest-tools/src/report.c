/* SPDX-License-Identifier: MIT */
/* report.c - see report.h */
#include "report.h"
#include "coord.h"
#include "options.h"
#include "stamp.h"
#include "uffd.h"
#include "util.h"

#include <stdio.h>
#include <unistd.h>

static void json_feature_list(struct json *j, const char *key, uint64_t mask)
{
	j_arr_open(j, key);
	for (size_t i = 0; i < uffd_nfeatures; i++)
		if (mask & uffd_features[i].bit)
			j_str(j, NULL, uffd_features[i].name);
	j_arr_close(j);
}

void report_config(struct coord *c)
{
	struct opts *o = c->o;
	struct json j;

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "config");
	j_str(&j, "tool", SNAPSHOT_TOOL);
	j_int(&j, "version", SNAPSHOT_VERSION);
	j_str(&j, "kernel", kernel_release());
	j_str(&j, "strategy", strategy_names[o->strategy]);
	j_str(&j, "backing", backing_names[o->backing]);
	j_uint(&j, "size_bytes", c->size);
	j_uint(&j, "page_size", c->psz);
	j_uint(&j, "pages", c->npages);
	j_int(&j, "writers", o->writers);
	j_str(&j, "pattern", pattern_names[o->pattern]);
	if (o->pattern == PAT_HOT)
		j_dbl(&j, "hot_fraction", o->hot_fraction);
	if (o->rate > 0) {
		j_dbl(&j, "rate", o->rate);
		j_dbl(&j, "rate_per_writer", o->rate / o->writers);
	} else {
		j_str(&j, "rate", "max");
		j_null(&j, "rate_per_writer");
	}
	j_dbl(&j, "duration_s", o->duration);
	j_dbl(&j, "warmup_s", o->warmup);
	j_dbl(&j, "timeout_s", o->timeout);
	j_bool(&j, "populate", o->populate);
	j_bool(&j, "prefill", o->prefill);
	j_bool(&j, "prearm", o->prearm);
	j_str(&j, "unprotect", unprotect_names[o->unprotect]);
	j_str(&j, "release", release_names[o->release]);
	j_uint(&j, "release_mb", o->release_mb);
	j_uint(&j, "copy_ahead", o->copy_ahead);
	j_uint(&j, "copy_run", o->copy_run);
	j_int(&j, "unregistered", o->unregistered);
	j_bool(&j, "fd_writes", o->fd_writes);
	j_bool(&j, "punch_hole", o->punch_hole);
	j_bool(&j, "fork_child", o->fork_child);
	j_str(&j, "kernel_writes", kwrite_names[o->kernel_writes]);
	j_bool(&j, "zap_after_arm", o->zap_after_arm);
	j_str(&j, "uffd_source", uffd_source_names[o->uffd_source]);
	j_str(&j, "verify", vmode_names[o->verify]);
	j_uint(&j, "seed", o->seed);
	j_uint(&j, "corrupt_snapshot", o->corrupt);
	json_feature_list(&j, "features_offered", c->offered);
	json_feature_list(&j, "features_used", o->uffd_features);
	j_int(&j, "coordinator_pid", getpid());
	j_arr_open(&j, "writer_pids");
	for (int i = 0; i < o->writers; i++)
		j_int(&j, NULL, atomic_load(&c->ctl->slot[i].pid));
	j_arr_close(&j);
	if (c->child_pid > 0)
		j_int(&j, "fork_child_pid", c->child_pid);
	else
		j_null(&j, "fork_child_pid");
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
}

static double per_s(uint64_t n, uint64_t ns)
{
	return ns ? (double)n * 1e9 / (double)ns : 0.0;
}

static void emit_injections(struct json *j, struct coord *c)
{
	struct opts *o = c->o;
	struct slot *w0 = &c->ctl->slot[0];

	j_obj_open(j, "injections");
	if (o->unregistered)
		j_int(j, "unregistered_writers", o->unregistered);
	if (o->fd_writes) {
		j_obj_open(j, "fd_writes");
		j_uint(j, "writer", 0);
		j_uint(j, "ops", atomic_load(&w0->ops));
		j_obj_close(j);
	}
	if (o->punch_hole) {
		j_obj_open(j, "punch_hole");
		j_uint(j, "first_page", w0->punch_first);
		j_uint(j, "pages", w0->punch_pages);
		j_obj_close(j);
	}
	if (o->fork_child) {
		j_obj_open(j, "fork_child");
		j_int(j, "pid", c->child_pid);
		j_uint(j, "ops", atomic_load(&c->ctl->slot[o->writers].ops));
		j_obj_close(j);
	}
	if (o->kernel_writes != KW_NONE) {
		j_obj_open(j, "kernel_writes");
		j_str(j, "mode", kwrite_names[o->kernel_writes]);
		j_uint(j, "attempted", w0->kw_attempted);
		j_uint(j, "ok", w0->kw_ok);
		j_uint(j, "efault", w0->kw_efault);
		j_obj_close(j);
	}
	if (o->zap_after_arm) {
		j_obj_open(j, "zap");
		j_uint(j, "first_page", w0->zap_first);
		j_int(j, "pages", w0->zap_pages);
		j_int(j, "wp_bit_before", w0->zap_wp_before);
		j_int(j, "wp_bit_after", w0->zap_wp_after);
		j_obj_close(j);
	}
	j_obj_close(j);
}

/* The word that decided a mismatch, decoded. */
static void emit_word(struct json *j, const char *key, const uint8_t *page, uint64_t p, int word)
{
	uint64_t w = ((const uint64_t *)page)[word];
	struct stamp s;
	char hex[24];

	j_obj_open(j, key);
	snprintf(hex, sizeof(hex), "0x%016llx", (unsigned long long)w);
	j_str(j, "raw", hex);
	if (word < STAMP_SLOTS && stamp_decode(w, p, (unsigned)word, &s)) {
		j_uint(j, "epoch", s.epoch);
		j_uint(j, "how", s.how);
		j_uint(j, "seq", s.seq);
	}
	j_obj_close(j);
}

/* What the first mismatched pages hold: enough to tell corruption from a
 * late write without rerunning. */
static void emit_samples(struct json *j, struct coord *c, const struct verify_out *v)
{
	j_arr_open(j, "mismatch_samples");
	for (unsigned k = 0; k < v->nfirst && k < 4; k++) {
		uint64_t p = v->first_bad[k];
		const uint8_t *pg = c->snap + p * c->psz;

		j_obj_open(j, NULL);
		j_uint(j, "page", p);
		j_str(j, "cause", cause_names[v->first_cause[k]]);
		j_bool(j, "zero", page_is_zero(pg, c->psz));
		if (v->first_word[k] >= 0) {
			j_int(j, "word", v->first_word[k]);
			emit_word(j, "snapshot", pg, p, v->first_word[k]);
			if (c->ref)
				emit_word(j, "reference", c->ref + p * c->psz, p, v->first_word[k]);
		}
		j_obj_close(j);
	}
	j_arr_close(j);
}

void report_summary(struct coord *c, const struct verify_out *v)
{
	struct opts *o = c->o;
	uint64_t stall_max = 0, stall_total = 0, faults = 0, prearm = 0;
	int64_t prss = 0, ppte = 0, rss0 = 0, pte0 = 0;
	uint64_t pop_ns = 0, populated = 0;
	uint64_t snap_ns = c->t_copied - c->t_snap0;
	struct json j;

	for (int i = 0; i < c->npart; i++) {
		struct slot *s = &c->ctl->slot[i];

		if (s->stall_max_ns > stall_max)
			stall_max = s->stall_max_ns;
		stall_total += s->stall_total_ns;
	}
	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];

		faults += atomic_load(&p->faults);
		prearm += atomic_load(&p->prearm_faults);
		prss += p->rss1 - p->rss0;
		ppte += p->pte1 - p->pte0;
		rss0 += p->rss0;
		pte0 += p->pte0;
		populated += p->populated;
		if (p->populate_ns > pop_ns)
			pop_ns = p->populate_ns;
	}

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "summary");
	j_str(&j, "tool", SNAPSHOT_TOOL);
	j_str(&j, "strategy", strategy_names[o->strategy]);
	j_str(&j, "backing", backing_names[o->backing]);
	j_str(&j, "kernel", kernel_release());
	j_str(&j, "uffd_source", uffd_source_names[o->uffd_source]);
	json_feature_list(&j, "features_used", o->uffd_features);
	j_int(&j, "writers", o->writers);
	j_uint(&j, "pages", c->npages);
	j_uint(&j, "page_size", c->psz);
	j_uint(&j, "bytes", c->size);
	j_dbl(&j, "snapshot_ms", ns_to_ms(snap_ns));
	j_dbl(&j, "copy_ms", ns_to_ms(c->t_copied - c->t_instant));
	j_dbl(&j, "throughput_mb_s", per_s(c->size, snap_ns) / 1e6);
	j_dbl(&j, "arm_ms", ns_to_ms(c->arm_ns));
	j_dbl(&j, "pause_ms", ns_to_ms(c->pause_ns));
	j_dbl(&j, "disarm_ms", ns_to_ms(c->disarm_ns));
	j_dbl(&j, "inject_wait_ms", ns_to_ms(c->inject_wait_ns));
	j_bool(&j, "inject_sync_timeout", c->inject_timeout);

	j_arr_open(&j, "faults_per_process");
	for (int i = 0; i < c->nproc; i++)
		j_uint(&j, NULL, atomic_load(&c->proc[i].faults));
	j_arr_close(&j);
	j_uint(&j, "faults_total", faults);
	j_arr_open(&j, "prearm_faults_per_process");
	for (int i = 0; i < c->nproc; i++)
		j_uint(&j, NULL, atomic_load(&c->proc[i].prearm_faults));
	j_arr_close(&j);
	j_uint(&j, "prearm_faults_total", prearm);
	{
		uint64_t late = 0;

		for (int i = 0; i < c->nproc; i++)
			late += atomic_load(&c->proc[i].late_faults);
		j_uint(&j, "faults_after_copy", late);
	}
	hist_json_summary(&j, "fault_latency_us", &c->lat);
	hist_json_buckets(&j, "fault_latency_hist", &c->lat);

	j_dbl(&j, "writer_stall_max_ms", ns_to_ms(stall_max));
	j_dbl(&j, "writer_stall_total_ms", ns_to_ms(stall_total));
	j_arr_open(&j, "writer_stall_max_ms_per_writer");
	for (int i = 0; i < c->npart; i++)
		j_dbl(&j, NULL, ns_to_ms(c->ctl->slot[i].stall_max_ns));
	j_arr_close(&j);
	j_dbl(&j, "writer_ops_per_s_before",
	      per_s(c->ops_snap0 - c->ops_go, c->t_snap0 - c->t_go));
	j_dbl(&j, "writer_ops_per_s_during",
	      per_s(c->ops_copied - c->ops_snap0, snap_ns));
	j_uint(&j, "writer_ops_total", coord_total_ops(c));

	j_uint(&j, "pages_populated", populated);
	j_dbl(&j, "populate_ms", ns_to_ms(pop_ns));
	j_int(&j, "populate_rss_kb_delta", prss);
	j_int(&j, "populate_vmpte_kb_delta", ppte);
	j_int(&j, "rss_kb_delta", c->rss_snap1 - rss0);
	j_int(&j, "vmpte_kb_delta", c->pte_snap1 - pte0);
	j_int(&j, "snapshot_rss_kb_delta", c->rss_snap1 - c->rss_snap0);
	j_int(&j, "snapshot_vmpte_kb_delta", c->pte_snap1 - c->pte_snap0);

	if (o->strategy == ST_ASYNC) {
		j_obj_open(&j, "async");
		j_int(&j, "rounds", c->rounds);
		j_arr_open(&j, "dirty_pages_per_round");
		for (int r = 0; r < c->rounds; r++)
			j_uint(&j, NULL, c->dirty_round[r]);
		j_arr_close(&j);
		j_uint(&j, "final_dirty_pages", c->final_dirty);
		j_dbl(&j, "final_pause_ms", ns_to_ms(c->pause_ns));
		j_str(&j, "guarantee",
		      "image of RAM at the final pause; writes through the fd are not tracked");
		j_obj_close(&j);
	}
	emit_injections(&j, c);

	j_str(&j, "verify", vmode_names[o->verify]);
	if (o->verify == V_OFF) {
		j_null(&j, "consistent");
		j_null(&j, "mismatched_pages");
		j_null(&j, "mismatches_by_cause");
	} else {
		j_bool(&j, "consistent", v->mismatched == 0);
		j_uint(&j, "mismatched_pages", v->mismatched);
		j_obj_open(&j, "mismatches_by_cause");
		for (int k = 0; k < CAUSE_N; k++)
			if (v->by_cause[k])
				j_uint(&j, cause_names[k], v->by_cause[k]);
		j_obj_close(&j);
		j_arr_open(&j, "first_mismatched_pages");
		for (unsigned k = 0; k < v->nfirst; k++)
			j_uint(&j, NULL, v->first_bad[k]);
		j_arr_close(&j);
		emit_samples(&j, c, v);
	}
	j_dbl(&j, "verify_ms", ns_to_ms(c->verify_ns));
	j_dbl(&j, "verify_ref_ms", ns_to_ms(c->ref_ns));
	j_dbl(&j, "elapsed_ms", ns_to_ms(now_ns() - c->t_start));
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
}

void report_progress(struct coord *c, const char *phase, bool force)
{
	uint64_t t = now_ns();
	struct json j;

	if (!force && t < c->next_progress)
		return;
	c->next_progress = t + (uint64_t)c->o->progress_ms * 1000000ULL;
	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "progress");
	j_str(&j, "phase", phase);
	j_uint(&j, "pages_copied", atomic_load(&c->copied));
	j_uint(&j, "pages_total", c->npages);
	j_uint(&j, "faults", coord_total_faults(c));
	j_uint(&j, "writer_ops", coord_total_ops(c));
	j_dbl(&j, "elapsed_ms", ns_to_ms(t - c->t_start));
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
}
