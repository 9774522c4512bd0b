/* SPDX-License-Identifier: MIT */
/* options.c - see options.h */
#include "options.h"
#include "uffd.h"
#include "util.h"

#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *const strategy_names[ST_N] = {
	[ST_STW] = "stop-the-world",
	[ST_WP] = "uffd-wp",
	[ST_WP_STAGGERED] = "uffd-wp-staggered",
	[ST_ASYNC] = "async-scan",
};

const char *const backing_names[B_N] = {
	[B_MEMFD] = "memfd",
	[B_SHMEM] = "shmem",
	[B_HUGETLBFS] = "hugetlbfs",
	[B_ANON] = "anon",
};

const char *const pattern_names[PAT_N] = {
	[PAT_UNIFORM] = "uniform",
	[PAT_SEQUENTIAL] = "sequential",
	[PAT_HOT] = "hot",
};

const char *const kwrite_names[KW_N] = {
	[KW_NONE] = "none",
	[KW_READ] = "read",
	[KW_PVW] = "process_vm_writev",
};

const char *const vmode_names[V_N] = {
	[V_OFF] = "off",
	[V_STAMP] = "stamp",
	[V_COPY] = "copy",
};

const char *const unprotect_names[UNPROT_N] = {
	[UNPROT_ALL] = "all",
	[UNPROT_FAULTING] = "faulting",
};

const char *const release_names[REL_N] = {
	[REL_CHUNK] = "chunk",
	[REL_END] = "end",
};

static const char *const yes_no_names[] = { "no", "yes" };

#define DEFAULT_SIZE (64ULL << 20)
/* Engine tunables' defaults: the fastest exact setting measured
 * (docs/snapshot-engine.md).  The window and the copier's run are sizes,
 * in 4 KiB pages: on huge pages they are one page each, since a window of
 * 64 huge pages (128 MiB) held the fault handler for tens of ms. */
#define DEFAULT_COPY_AHEAD 64
#define DEFAULT_COPY_RUN 32
#define DEFAULT_RELEASE_MB 2
#define DEFAULT_UNIT 4096u

static void usage(FILE *f)
{
	fprintf(f,
"usage: uffd-snapshot [options]\n"
"  --strategy stop-the-world|uffd-wp|uffd-wp-staggered|async-scan  (uffd-wp)\n"
"  --backing memfd|shmem|hugetlbfs|anon       guest RAM backing (memfd)\n"
"  --size SIZE                                RAM size, e.g. 64M, 1G (64M)\n"
"  --writers N                                writer processes, " STR(LIM_WRITERS_MIN) ".." STR(LIM_WRITERS_MAX) " (1)\n"
"  --pattern uniform|sequential|hot:FRACTION  page choice (uniform)\n"
"  --rate OPS|max                             combined page writes/s of all writers, " STR(LIM_RATE_MIN) ".." STR(LIM_RATE_MAX) " (max)\n"
"  --duration SECONDS                         writers run this long (1)\n"
"  --warmup SECONDS                           writing before the snapshot starts (min(0.2, duration/4))\n"
"  --timeout SECONDS                          hard limit for the whole run (duration + 60,\n"
"                                             uffd-wp-staggered: + the stagger of all writers)\n"
"  --populate yes|no                          writers fault all RAM in before arming (no)\n"
"  --prefill yes|no                           coordinator writes every page first (yes)\n"
"  --prearm yes|no                            uffd-wp: protect while running, short final pause (yes)\n"
"  --unprotect all|faulting                   after copying a faulted page, un-protect it in every\n"
"                                             process (all, the thread's step 2c) or only the faulting one\n"
"  --release chunk|end                        uffd-wp: un-protect copied RAM every --release-mb while copying,\n"
"                                             or all at the end (chunk)\n"
"  --release-mb MB                            --release chunk granularity, " STR(LIM_RELEASE_MB_MIN) ".." STR(LIM_RELEASE_MB_MAX) " (" STR(DEFAULT_RELEASE_MB) ")\n"
"  --copy-ahead PAGES                         uffd-wp: on a fault during the copy, copy the aligned window of\n"
"                                             PAGES around it and un-protect it with one ioctl per process,\n"
"                                             " STR(LIM_COPY_AHEAD_MIN) ".." STR(LIM_COPY_AHEAD_MAX) " (" STR(DEFAULT_COPY_AHEAD) "; hugetlbfs: 1; 1 = only the faulting page)\n"
"  --copy-run PAGES                           pages the background copier claims and copies at once,\n"
"                                             " STR(LIM_COPY_RUN_MIN) ".." STR(LIM_COPY_RUN_MAX) " (" STR(DEFAULT_COPY_RUN) "; hugetlbfs: 1)\n"
"  --unregistered K                           the last K writers map RAM but never register (0)\n"
"  --fd-writes                                writer 0 writes with pwrite() on the fd\n"
"  --punch-hole                               writer 0 punches %d pages after the instant\n"
"  --fork-child                               writer 0 forks a child that writes (no EVENT_FORK)\n"
"  --kernel-writes read|process_vm_writev     writer 0 writes through the kernel\n"
"  --uffd-source syscall|syscall-user-only|devuserfaultfd  (syscall)\n"
"  --zap-after-arm                            writer 0 MADV_DONTNEEDs %d pages after the instant, then writes them\n"
"  --verify[=stamp|copy]                      check the snapshot against RAM at the instant\n"
"  --corrupt-snapshot N                       damage N snapshot pages before verifying (verifier self-check)\n"
"  --seed N                                   random seed (1)\n"
"  --progress-ms MS                           progress record interval (200)\n"
"  --stagger-ms MS                            uffd-wp-staggered: delay before arming each writer, " STR(LIM_STAGGER_MS_MIN) ".." STR(LIM_STAGGER_MS_MAX) " (2)\n"
"  --scan-rounds N                            async-scan: rescans before the final pause (5)\n"
"  --dry-run                                  check the options, print the plan (which uffd features\n"
"                                             the run needs, first kernel) and exit\n"
"  --self-test                                run internal checks and exit\n",
		INJECT_PAGES, INJECT_PAGES);
}

/* ---- value parsers: each dies with a message naming flag, value, expectation ---- */

static int parse_choice(const char *flag, const char *v, const char *const *names, int n)
{
	char expect[256] = "";

	for (int i = 0; i < n; i++)
		if (!strcmp(v, names[i]))
			return i;
	for (int i = 0; i < n; i++) {
		strncat(expect, names[i], sizeof(expect) - strlen(expect) - 1);
		if (i + 1 < n)
			strncat(expect, i + 2 == n ? " or " : ", ",
				sizeof(expect) - strlen(expect) - 1);
	}
	die_usage(flag, "%s: got '%s', expected %s", flag, v, expect);
}

static bool parse_yes_no(const char *flag, const char *v)
{
	return parse_choice(flag, v, yes_no_names, ARRAY_SIZE(yes_no_names)) == 1;
}

static uint64_t parse_int_range(const char *flag, const char *v, uint64_t lo, uint64_t hi)
{
	uint64_t x;

	if (!parse_u64(v, &x) || x < lo || x > hi)
		die_usage(flag, "%s: got '%s', expected an integer from %" PRIu64 " to %" PRIu64,
			  flag, v, lo, hi);
	return x;
}

static double parse_real_range(const char *flag, const char *v, double lo, double hi)
{
	double x;

	if (!parse_double(v, &x) || !(x >= lo && x <= hi))
		die_usage(flag, "%s: got '%s', expected a number from %g to %g", flag, v, lo, hi);
	return x;
}

/* "max" (0) or combined page writes per second: a tiny rate would make
 * the writers' interval overflow its integer, so it is refused here. */
static double parse_rate(const char *flag, const char *v)
{
	double x;

	if (!strcmp(v, "max"))
		return 0;
	if (!parse_double(v, &x) || !(x >= LIM_RATE_MIN && x <= LIM_RATE_MAX))
		die_usage(flag, "%s: got '%s', expected max or a number of page writes per second "
			  "from " STR(LIM_RATE_MIN) " to " STR(LIM_RATE_MAX), flag, v);
	return x;
}

static void parse_pattern(struct opts *o, const char *v)
{
	if (!strcmp(v, pattern_names[PAT_UNIFORM])) {
		o->pattern = PAT_UNIFORM;
	} else if (!strcmp(v, pattern_names[PAT_SEQUENTIAL])) {
		o->pattern = PAT_SEQUENTIAL;
	} else if (!strncmp(v, "hot:", 4)) {
		double f;

		if (!parse_double(v + 4, &f) ||
		    !(f > LIM_HOT_FRACTION_MIN && f <= LIM_HOT_FRACTION_MAX))
			die_usage("--pattern", "--pattern: got '%s', expected hot:FRACTION with "
				  STR(LIM_HOT_FRACTION_MIN) " < FRACTION <= " STR(LIM_HOT_FRACTION_MAX)
				  ", e.g. hot:0.1", v);
		o->pattern = PAT_HOT;
		o->hot_fraction = f;
	} else {
		die_usage("--pattern",
			  "--pattern: got '%s', expected uniform, sequential or hot:FRACTION", v);
	}
}

enum {
	OPT_STRATEGY = 256, OPT_BACKING, OPT_SIZE, OPT_WRITERS, OPT_PATTERN, OPT_RATE,
	OPT_DURATION, OPT_WARMUP, OPT_TIMEOUT, OPT_POPULATE, OPT_PREFILL, OPT_PREARM,
	OPT_UNREG, OPT_FDW, OPT_PUNCH, OPT_FORK, OPT_KW, OPT_SRC, OPT_ZAP, OPT_VERIFY,
	OPT_SEED, OPT_CORRUPT, OPT_UNPROTECT, OPT_RELEASE, OPT_PROGRESS, OPT_STAGGER,
	OPT_ROUNDS, OPT_COPY_AHEAD, OPT_COPY_RUN, OPT_RELEASE_MB, OPT_DRY_RUN, OPT_SELFTEST, OPT_HELP,
};

static const struct option long_opts[] = {
	{ "strategy", required_argument, NULL, OPT_STRATEGY },
	{ "backing", required_argument, NULL, OPT_BACKING },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "writers", required_argument, NULL, OPT_WRITERS },
	{ "pattern", required_argument, NULL, OPT_PATTERN },
	{ "rate", required_argument, NULL, OPT_RATE },
	{ "duration", required_argument, NULL, OPT_DURATION },
	{ "warmup", required_argument, NULL, OPT_WARMUP },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "populate", required_argument, NULL, OPT_POPULATE },
	{ "prefill", required_argument, NULL, OPT_PREFILL },
	{ "prearm", required_argument, NULL, OPT_PREARM },
	{ "unregistered", required_argument, NULL, OPT_UNREG },
	{ "fd-writes", no_argument, NULL, OPT_FDW },
	{ "punch-hole", no_argument, NULL, OPT_PUNCH },
	{ "fork-child", no_argument, NULL, OPT_FORK },
	{ "kernel-writes", required_argument, NULL, OPT_KW },
	{ "uffd-source", required_argument, NULL, OPT_SRC },
	{ "zap-after-arm", no_argument, NULL, OPT_ZAP },
	{ "verify", optional_argument, NULL, OPT_VERIFY },
	{ "seed", required_argument, NULL, OPT_SEED },
	{ "corrupt-snapshot", required_argument, NULL, OPT_CORRUPT },
	{ "unprotect", required_argument, NULL, OPT_UNPROTECT },
	{ "release", required_argument, NULL, OPT_RELEASE },
	{ "progress-ms", required_argument, NULL, OPT_PROGRESS },
	{ "stagger-ms", required_argument, NULL, OPT_STAGGER },
	{ "scan-rounds", required_argument, NULL, OPT_ROUNDS },
	{ "copy-ahead", required_argument, NULL, OPT_COPY_AHEAD },
	{ "copy-run", required_argument, NULL, OPT_COPY_RUN },
	{ "release-mb", required_argument, NULL, OPT_RELEASE_MB },
	{ "dry-run", no_argument, NULL, OPT_DRY_RUN },
	{ "self-test", no_argument, NULL, OPT_SELFTEST },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

static const char *option_name(int val)
{
	for (const struct option *o = long_opts; o->name; o++)
		if (o->val == val)
			return o->name;
	return "?";
}

/* Flags that need a shared backing or writer 0's fd. */
static void check_combinations(struct opts *o, bool timeout_set, bool warmup_set)
{
	double stagger_s = 0;
	int armed = 0;

	if (o->backing == B_ANON) {
		const char *flag = o->fd_writes ? "--fd-writes" :
				   o->punch_hole ? "--punch-hole" :
				   o->fork_child ? "--fork-child" :
				   o->unregistered ? "--unregistered" : NULL;

		if (flag)
			die_usage(flag,
				  "%s needs a shared backing (memfd, shmem or hugetlbfs): with "
				  "--backing anon the writers are threads of one process", flag);
	}
	if (o->backing == B_HUGETLBFS && o->fd_writes)
		die_usage("--fd-writes",
			  "--fd-writes: hugetlbfs files do not support write(2); use memfd or shmem");
	if (o->fd_writes && o->kernel_writes != KW_NONE)
		die_usage("--kernel-writes",
			  "--kernel-writes and --fd-writes both change how writer 0 writes: pick one");
	if (o->unregistered > o->writers)
		die_usage("--unregistered",
			  "--unregistered: got %d, expected at most --writers (%d)",
			  o->unregistered, o->writers);
	if (o->corrupt && o->verify == V_OFF)
		die_usage("--corrupt-snapshot",
			  "--corrupt-snapshot needs --verify (it checks the verifier)");
	if (o->corrupt && o->corrupt > o->size / 4096)
		die_usage("--corrupt-snapshot",
			  "--corrupt-snapshot: got %" PRIu64 ", expected at most the number of pages",
			  o->corrupt);
	if (!warmup_set)
		o->warmup = fmin(0.2, o->duration / 4);
	if (o->warmup >= o->duration)
		die_usage("--warmup", "--warmup: got %g, expected less than --duration (%g)",
			  o->warmup, o->duration);
	if (o->strategy == ST_WP_STAGGERED) {
		/* each armed process sleeps --stagger-ms, and --timeout bounds it all */
		armed = o->backing == B_ANON ? 1 : o->writers - o->unregistered;
		stagger_s = o->stagger_ms * armed / 1000;
	}
	if (!timeout_set)
		o->timeout = o->duration + stagger_s + 60;
	if (o->timeout <= o->duration)
		die_usage("--timeout", "--timeout: got %g, expected more than --duration (%g)",
			  o->timeout, o->duration);
	if (stagger_s + o->duration >= o->timeout)
		die_usage("--timeout",
			  "--timeout: got %g, but arming %d writer(s) --stagger-ms %g apart "
			  "(%g s) plus --duration %g needs more than that",
			  o->timeout, armed, o->stagger_ms, stagger_s, o->duration);
	/* async copies before the instant: only a reference copy can judge it */
	if (o->strategy == ST_ASYNC && o->verify == V_STAMP)
		o->verify = V_COPY;
}

long backing_page_size(enum backing b)
{
	return b == B_HUGETLBFS ? meminfo_value("Hugepagesize") * 1024 : sysconf(_SC_PAGESIZE);
}

uint64_t default_pages(uint64_t units, long psz)
{
	uint64_t per_page = psz > (long)DEFAULT_UNIT ? (uint64_t)psz / DEFAULT_UNIT : 1;

	return units / per_page ? units / per_page : 1;
}

/* --copy-ahead and --copy-run not given (0): their defaults for this backing. */
static void default_sizes(struct opts *o)
{
	long psz = backing_page_size(o->backing);

	if (!o->copy_ahead)
		o->copy_ahead = default_pages(DEFAULT_COPY_AHEAD, psz);
	if (!o->copy_run)
		o->copy_run = default_pages(DEFAULT_COPY_RUN, psz);
}

static void check_size(struct opts *o, const char *arg)
{
	long psz = backing_page_size(o->backing);
	long avail_kb = meminfo_value("MemAvailable");
	uint64_t copies = o->verify == V_COPY ? 3 : 2;   /* RAM + snapshot (+ reference) */
	char buf[32];

	if (arg)
		snprintf(buf, sizeof(buf), "%s", arg);
	else
		format_size(o->size, buf, sizeof(buf));
	if (psz <= 0)
		die_usage("--backing",
			  "--backing hugetlbfs: this kernel reports no huge page size");
	if (o->size < (uint64_t)psz * LIM_SIZE_PAGES_MIN || o->size % (uint64_t)psz)
		die_usage("--size", "--size: got '%s', expected a multiple of the page size (%ld) "
			  "and at least " STR(LIM_SIZE_PAGES_MIN) " pages", buf, psz);
	if (o->size / (uint64_t)psz > LIM_SIZE_PAGES_MAX)
		die_usage("--size",
			  "--size: got '%s', expected at most " STR(LIM_SIZE_PAGES_MAX) " pages", buf);
	if (avail_kb > 0 && o->size * copies > (uint64_t)avail_kb * 1024)
		die_usage("--size",
			  "--size: got '%s', but %" PRIu64 " copies of it exceed MemAvailable (%ld kB)",
			  buf, copies, avail_kb);
}

/* One of a table's names, as its index; a number within a limit of limits.h. */
#define PARSE_CHOICE(flag, v, names) parse_choice(flag, v, names, ARRAY_SIZE(names))
#define INT_IN(flag, v, lim) parse_int_range(flag, v, lim##_MIN, lim##_MAX)
#define REAL_IN(flag, v, lim) parse_real_range(flag, v, lim##_MIN, lim##_MAX)

enum action parse_options(int argc, char **argv, struct opts *o)
{
	bool timeout_set = false, warmup_set = false;
	const char *size_arg = NULL;
	char flag[64];
	int c;

	*o = (struct opts){ .strategy = ST_WP, .backing = B_MEMFD, .size = DEFAULT_SIZE,
			    .writers = 1, .pattern = PAT_UNIFORM, .rate = 0, .duration = 1,
			    .prefill = true, .prearm = true, .seed = 1, .progress_ms = 200,
			    .stagger_ms = 2, .scan_rounds = 5, .unprotect = UNPROT_ALL,
			    .release = REL_CHUNK, .release_mb = DEFAULT_RELEASE_MB };
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":", long_opts, NULL)) != -1) {
		snprintf(flag, sizeof(flag), "--%s", option_name(c));
		switch (c) {
		case OPT_STRATEGY:
			o->strategy = PARSE_CHOICE(flag, optarg, strategy_names);
			break;
		case OPT_BACKING:
			o->backing = PARSE_CHOICE(flag, optarg, backing_names);
			break;
		case OPT_SIZE:
			size_arg = optarg;
			if (!parse_size(optarg, &o->size))
				die_usage(flag, "--size: got '%s', expected a size like 64M or 1G",
					  optarg);
			break;
		case OPT_WRITERS:
			o->writers = (int)INT_IN(flag, optarg, LIM_WRITERS);
			break;
		case OPT_PATTERN:
			parse_pattern(o, optarg);
			break;
		case OPT_RATE:
			o->rate = parse_rate(flag, optarg);
			break;
		case OPT_DURATION:
			o->duration = REAL_IN(flag, optarg, LIM_DURATION);
			break;
		case OPT_WARMUP:
			o->warmup = REAL_IN(flag, optarg, LIM_WARMUP);
			warmup_set = true;
			break;
		case OPT_TIMEOUT:
			o->timeout = REAL_IN(flag, optarg, LIM_TIMEOUT);
			timeout_set = true;
			break;
		case OPT_POPULATE:
			o->populate = parse_yes_no(flag, optarg);
			break;
		case OPT_PREFILL:
			o->prefill = parse_yes_no(flag, optarg);
			break;
		case OPT_PREARM:
			o->prearm = parse_yes_no(flag, optarg);
			break;
		case OPT_UNREG:
			o->unregistered = (int)INT_IN(flag, optarg, LIM_UNREGISTERED);
			break;
		case OPT_FDW:
			o->fd_writes = true;
			break;
		case OPT_PUNCH:
			o->punch_hole = true;
			break;
		case OPT_FORK:
			o->fork_child = true;
			break;
		case OPT_KW:
			o->kernel_writes = PARSE_CHOICE(flag, optarg, kwrite_names);
			break;
		case OPT_SRC:
			o->uffd_source = PARSE_CHOICE(flag, optarg, uffd_source_names);
			break;
		case OPT_ZAP:
			o->zap_after_arm = true;
			break;
		case OPT_VERIFY:
			o->verify = optarg ? PARSE_CHOICE(flag, optarg, vmode_names) : V_STAMP;
			break;
		case OPT_SEED:
			o->seed = INT_IN(flag, optarg, LIM_SEED);
			break;
		case OPT_UNPROTECT:
			o->unprotect = PARSE_CHOICE(flag, optarg, unprotect_names);
			break;
		case OPT_RELEASE:
			o->release = PARSE_CHOICE(flag, optarg, release_names);
			break;
		case OPT_CORRUPT:
			o->corrupt = INT_IN(flag, optarg, LIM_CORRUPT_SNAPSHOT);
			break;
		case OPT_PROGRESS:
			o->progress_ms = (int)INT_IN(flag, optarg, LIM_PROGRESS_MS);
			break;
		case OPT_STAGGER:
			o->stagger_ms = REAL_IN(flag, optarg, LIM_STAGGER_MS);
			break;
		case OPT_ROUNDS:
			o->scan_rounds = (int)INT_IN(flag, optarg, LIM_SCAN_ROUNDS);
			break;
		case OPT_COPY_AHEAD:
			o->copy_ahead = INT_IN(flag, optarg, LIM_COPY_AHEAD);
			break;
		case OPT_COPY_RUN:
			o->copy_run = INT_IN(flag, optarg, LIM_COPY_RUN);
			break;
		case OPT_RELEASE_MB:
			o->release_mb = INT_IN(flag, optarg, LIM_RELEASE_MB);
			break;
		case OPT_DRY_RUN:
			o->dry_run = true;
			break;
		case OPT_SELFTEST:
			return ACT_SELF_TEST;
		case OPT_HELP:
			usage(stdout);
			exit(0);
		case ':':
			die_usage(argv[optind - 1], "%s needs a value (see --help)",
				  argv[optind - 1]);
		default:
			die_usage(argv[optind - 1], "unknown option '%s' (see --help)",
				  argv[optind - 1]);
		}
	}
	if (optind < argc)
		die_usage(argv[optind], "unexpected argument '%s' (see --help)", argv[optind]);
	check_combinations(o, timeout_set, warmup_set);
	check_size(o, size_arg);
	default_sizes(o);
	return ACT_RUN;
}
