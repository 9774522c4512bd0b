/* SPDX-License-Identifier: MIT */
/*
 * selftest.c - `uffd-snapshot --self-test`: checks of the parts that need
 * no kernel support: parsing, histogram, JSON, stamps, the plan, and above
 * all the verifier, which must report every kind of damage done to a
 * snapshot.
 */
#include "selftest.h"
#include "options.h"
#include "plan.h"
#include "stamp.h"
#include "uffd.h"
#include "util.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_pass, g_fail;
static struct json g_fails;

#define CHECK(cond) check((cond), #cond, __LINE__)

static void check(bool ok, const char *what, int line)
{
	char buf[256];

	if (ok) {
		g_pass++;
		return;
	}
	g_fail++;
	snprintf(buf, sizeof(buf), "line %d: %s", line, what);
	j_str(&g_fails, NULL, buf);
	fprintf(stderr, SNAPSHOT_TOOL " self-test: FAILED %s\n", buf);
}

static void test_parse(void)
{
	uint64_t v = 0;
	double d = 0;

	CHECK(parse_size("64M", &v) && v == 64ULL << 20);
	CHECK(parse_size("1G", &v) && v == 1ULL << 30);
	CHECK(parse_size("2m", &v) && v == 2ULL << 20);
	CHECK(parse_size("64MiB", &v) && v == 64ULL << 20);
	CHECK(parse_size("4096", &v) && v == 4096);
	CHECK(!parse_size("", &v));
	CHECK(!parse_size("-1", &v));
	CHECK(!parse_size("12X", &v));
	CHECK(!parse_size("99999999999T", &v));
	CHECK(parse_u64("42", &v) && v == 42);
	CHECK(!parse_u64("4x", &v));
	CHECK(!parse_u64("-4", &v));
	CHECK(parse_double("0.5", &d) && d == 0.5);
	CHECK(!parse_double("nan", &d));
	CHECK(!parse_double("1e999", &d));
	CHECK(!parse_double("inf", &d));
}

static void test_default_pages(void)
{
	CHECK(default_pages(64, 4096) == 64);
	CHECK(default_pages(32, 4096) == 32);
	CHECK(default_pages(64, 16384) == 16);
	CHECK(default_pages(64, 2L << 20) == 1);
	CHECK(default_pages(32, 1L << 30) == 1);
	CHECK(default_pages(64, 0) == 64);      /* no page size reported */
}

static void test_exit_descriptions(void)
{
	char buf[96];

	CHECK(!strcmp(signal_name(SIGTERM), "SIGTERM"));
	CHECK(signal_name(0) == NULL);
	describe_exit(SIGKILL, buf, sizeof(buf));     /* wait status of a SIGKILL death */
	CHECK(!strcmp(buf, "was killed by SIGKILL (signal 9)"));
	describe_exit(3 << 8, buf, sizeof(buf));
	CHECK(!strcmp(buf, "exited with status 3"));
}

static void test_hist(void)
{
	struct hist h;
	uint64_t p50, p99;

	hist_init(&h);
	for (uint64_t us = 1; us <= 1000; us++)
		hist_add(&h, us * 1000);
	p50 = hist_quantile(&h, 0.5);
	p99 = hist_quantile(&h, 0.99);
	CHECK(h.count == 1000 && h.max == 1000000);
	CHECK(p50 > 440000 && p50 < 560000);
	CHECK(p99 > 930000 && p99 <= 1000000);
	CHECK(hist_quantile(&h, 1.0) <= h.max);
	hist_init(&h);
	hist_add(&h, 7);
	CHECK(hist_quantile(&h, 0.5) == 7);
}

static void test_json(void)
{
	struct json j;

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "a", "q\"\n\\");
	j_arr_open(&j, "b");
	j_int(&j, NULL, -1);
	j_dbl(&j, NULL, 2.5);
	j_null(&j, NULL);
	j_arr_close(&j);
	j_bool(&j, "c", true);
	j_obj_close(&j);
	CHECK(!strcmp(j.buf, "{\"a\":\"q\\\"\\u000a\\\\\",\"b\":[-1,2.5,null],\"c\":true}"));
	j_free(&j);
}

static void test_stamp(void)
{
	uint64_t w = stamp_word(77, 3, HOW_PWRITE, 1, 123);
	struct stamp s;

	CHECK(stamp_decode(w, 77, 3, &s) && s.how == HOW_PWRITE && s.epoch == 1 && s.seq == 123);
	CHECK(!stamp_decode(w, 78, 3, &s));          /* another page */
	CHECK(!stamp_decode(w, 77, 4, &s));          /* another slot */
	CHECK(!stamp_decode(w ^ (1ULL << 60), 77, 3, &s));
	CHECK(!stamp_decode(w ^ 1, 77, 3, &s));
	CHECK(!stamp_decode(0, 77, 3, &s));
	CHECK(page_pattern_word(5, 9, true) != 0 && page_pattern_word(5, 9, false) == 0);
}

/* Every enumerated choice has a name: the tables parse and print. */
static void test_names(void)
{
	for (int i = 0; i < ST_N; i++)
		CHECK(strategy_names[i] != NULL);
	for (int i = 0; i < B_N; i++)
		CHECK(backing_names[i] != NULL);
	for (int i = 0; i < PAT_N; i++)
		CHECK(pattern_names[i] != NULL);
	for (int i = 0; i < KW_N; i++)
		CHECK(kwrite_names[i] != NULL);
	for (int i = 0; i < V_N; i++)
		CHECK(vmode_names[i] != NULL);
	for (int i = 0; i < UNPROT_N; i++)
		CHECK(unprotect_names[i] != NULL);
	for (int i = 0; i < REL_N; i++)
		CHECK(release_names[i] != NULL);
	for (int i = 0; i < UFFD_SRC_N; i++)
		CHECK(uffd_source_names[i] != NULL);
	for (int i = 0; i < NEED_N; i++)
		CHECK(need_info[i].name != NULL && need_info[i].release != NULL);
}

/* The plan: what needs what, and releases compared as numbers. */
static void test_plan(void)
{
	struct opts o = { .strategy = ST_WP, .backing = B_MEMFD, .prefill = true };
	struct plan p = plan_features(&o);

	CHECK(p.need == NEED_BIT(NEED_WP_HUGETLBFS_SHMEM));
	CHECK(p.ask == UFFD_FEATURE_WP_HUGETLBFS_SHMEM && !p.ask_if_offered);
	CHECK(!strcmp(plan_first_kernel(&p), need_info[NEED_WP_HUGETLBFS_SHMEM].release));
	o.strategy = ST_STW;
	p = plan_features(&o);
	CHECK(!p.need && !p.ask && !strcmp(plan_first_kernel(&p), "any"));
	/* 5.11 is later than 5.7 */
	o = (struct opts){ .strategy = ST_WP, .backing = B_ANON, .prefill = true,
			   .uffd_source = UFFD_SRC_SYSCALL_USER_ONLY };
	p = plan_features(&o);
	CHECK(p.need == (NEED_BIT(NEED_PAGEFAULT_FLAG_WP) | NEED_BIT(NEED_THREAD_ID) |
			 NEED_BIT(NEED_USER_MODE_ONLY)));
	CHECK(!strcmp(plan_first_kernel(&p), need_info[NEED_USER_MODE_ONLY].release));
	CHECK(p.ask == UFFD_FEATURE_THREAD_ID && p.ask_if_offered == UFFD_FEATURE_WP_UNPOPULATED);
	o.prefill = false;
	p = plan_features(&o);
	CHECK(plan_needs(&p, NEED_WP_UNPOPULATED));
	o.strategy = ST_ASYNC;
	p = plan_features(&o);
	CHECK(plan_needs(&p, NEED_WP_ASYNC) && plan_needs(&p, NEED_PAGEMAP_SCAN));
	CHECK(p.ask & UFFD_FEATURE_WP_ASYNC);
}

/* A tiny RAM of 64 pages, an exact copy as snapshot, then one kind of
 * damage per page; the verifier must name each. */
#define NP 64
#define PS 4096

static void write_stamp(uint8_t *ram, uint64_t p, unsigned writer, unsigned how, unsigned epoch)
{
	((uint64_t *)(ram + p * PS))[writer] = stamp_word(p, writer, how, epoch, p + 1000);
}

static void test_verifier(bool copy_mode)
{
	uint8_t *ram = xcalloc(NP, PS), *snap = xcalloc(NP, PS), *ref = xcalloc(NP, PS);
	uint8_t roles[3] = { ROLE_REGISTERED, ROLE_UNREGISTERED, ROLE_FORK_CHILD };
	struct verify_in in = { .snap = snap, .ref = copy_mode ? ref : NULL, .psz = PS,
				.npages = NP, .prefilled = true, .arm_epoch = 1,
				.roles = roles, .nroles = 3, .punch_first = 20, .punch_pages = 4 };
	struct verify_out out;
	uint64_t pre_punch[1] = { 1ULL << 22 };

	for (uint64_t p = 0; p < NP; p++)
		page_prefill(ram + p * PS, PS, p);
	for (uint64_t p = 0; p < NP; p += 3) {
		write_stamp(ram, p, 0, HOW_STORE, 0);      /* writes before the instant */
		write_stamp(ram, p, 1, HOW_STORE, 0);
	}
	memcpy(ref, ram, NP * PS);                      /* RAM at the instant */
	memcpy(snap, ram, NP * PS);
	verify_snapshot(&in, &out);
	CHECK(out.mismatched == 0);

	/* damage, one cause per page */
	write_stamp(snap, 1, 0, HOW_STORE, 1);           /* wp-missed */
	write_stamp(snap, 2, 1, HOW_STORE, 1);           /* unregistered */
	write_stamp(snap, 4, 2, HOW_STORE, 1);           /* fork-child */
	write_stamp(snap, 5, 0, HOW_PWRITE, 1);          /* fd-write */
	write_stamp(snap, 7, 0, HOW_KREAD, 1);           /* kernel-write */
	memset(snap + 21 * PS, 0, PS);                   /* punch-hole */
	memset(snap + 30 * PS, 0, PS);                   /* zeroed */
	snap[40 * PS + 1000] ^= 1;                       /* invalid-content: body */
	memcpy(snap + 41 * PS, snap + 42 * PS, 8);       /* invalid-content: misplaced stamp */
	verify_snapshot(&in, &out);
	CHECK(out.mismatched == 9);
	CHECK(out.by_cause[CAUSE_WP_MISSED] == 1);
	CHECK(out.by_cause[CAUSE_UNREGISTERED] == 1);
	CHECK(out.by_cause[CAUSE_FORK_CHILD] == 1);
	CHECK(out.by_cause[CAUSE_FD_WRITE] == 1);
	CHECK(out.by_cause[CAUSE_KERNEL_WRITE] == 1);
	CHECK(out.by_cause[CAUSE_PUNCH_HOLE] == 1);
	CHECK(out.by_cause[CAUSE_ZEROED] == 1);
	CHECK(out.by_cause[CAUSE_INVALID] == 2);
	in.staggered = true;
	verify_snapshot(&in, &out);
	CHECK(out.by_cause[CAUSE_STAGGERED] == 1 && out.by_cause[CAUSE_WP_MISSED] == 0);
	in.staggered = false;

	/* a punched page copied after the punch, written unseen since (the
	 * punch dropped its marker): the punch's doing, not a missed fault */
	memset(snap + 22 * PS, 0, PS);
	write_stamp(snap, 22, 0, HOW_STORE, 1);
	verify_snapshot(&in, &out);
	CHECK(out.mismatched == 10 && out.by_cause[CAUSE_PUNCH_HOLE] == 2 &&
	      out.by_cause[CAUSE_WP_MISSED] == 1);
	/* the same content in a page copied before the punch began: a miss */
	in.pre_punch = pre_punch;
	verify_snapshot(&in, &out);
	CHECK(out.mismatched == 10 && out.by_cause[CAUSE_PUNCH_HOLE] == 1 &&
	      out.by_cause[CAUSE_WP_MISSED] == 2);
	in.pre_punch = NULL;

	/* --corrupt-snapshot on a clean copy: exactly N invalid pages */
	memcpy(snap, ram, NP * PS);
	corrupt_snapshot(snap, PS, NP, 5);
	verify_snapshot(&in, &out);
	CHECK(out.mismatched == 5 && out.by_cause[CAUSE_INVALID] == 5);

	if (copy_mode) {
		/* stale: the instant saw a write the snapshot does not have */
		memcpy(snap, ram, NP * PS);
		write_stamp(ref, 9, 0, HOW_PWRITE, 0);
		write_stamp(ref, 10, 0, HOW_STORE, 0);
		verify_snapshot(&in, &out);
		CHECK(out.mismatched == 2 && out.by_cause[CAUSE_FD_WRITE] == 1 &&
		      out.by_cause[CAUSE_STALE] == 1);
	} else {
		/* not prefilled: zero pages are right exactly where nothing was written */
		uint64_t written[1] = { 0 };

		memset(ram, 0, NP * PS);
		write_stamp(ram, 3, 0, HOW_STORE, 0);
		written[0] = 1ULL << 3;
		memcpy(snap, ram, NP * PS);
		in.prefilled = false;
		in.written = written;
		verify_snapshot(&in, &out);
		CHECK(out.mismatched == 0);
		memset(snap + 3 * PS, 0, PS);
		verify_snapshot(&in, &out);
		CHECK(out.mismatched == 1 && out.by_cause[CAUSE_ZEROED] == 1);
	}
	free(ram);
	free(snap);
	free(ref);
}

int self_test(void)
{
	struct json j;

	j_init(&g_fails);
	test_parse();
	test_default_pages();
	test_exit_descriptions();
	test_hist();
	test_json();
	test_stamp();
	test_names();
	test_plan();
	test_verifier(false);
	test_verifier(true);
	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "self-test");
	j_str(&j, "tool", SNAPSHOT_TOOL);
	j_int(&j, "passed", g_pass);
	j_int(&j, "failed", g_fail);
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
	j_free(&g_fails);
	return g_fail ? EXIT_RUNTIME : EXIT_RAN;
}
