/* SPDX-License-Identifier: MIT */
/*
 * options.h - uffd-snapshot's command line: the options of a run, each
 * enumerated choice with the one table of its names (used to parse and to
 * print), and the parser that checks every value and combination.
 */
#ifndef UFFDLAB_OPTIONS_H
#define UFFDLAB_OPTIONS_H

#include "limits.h"
#include "uffd.h"

#include <stdbool.h>
#include <stdint.h>

#define SNAPSHOT_TOOL "uffd-snapshot"  /* "tool" of every record */
#define SNAPSHOT_VERSION 1             /* "version" of config and plan records */
#define INJECT_PAGES 16                /* pages touched by --punch-hole / --zap-after-arm */

enum strategy { ST_STW, ST_WP, ST_WP_STAGGERED, ST_ASYNC, ST_N };
enum backing { B_MEMFD, B_SHMEM, B_HUGETLBFS, B_ANON, B_N };
enum pattern { PAT_UNIFORM, PAT_SEQUENTIAL, PAT_HOT, PAT_N };
enum kwrite { KW_NONE, KW_READ, KW_PVW, KW_N };
enum vmode { V_OFF, V_STAMP, V_COPY, V_N };
enum unprotect { UNPROT_ALL, UNPROT_FAULTING, UNPROT_N };
enum release { REL_CHUNK, REL_END, REL_N };

extern const char *const strategy_names[ST_N];
extern const char *const backing_names[B_N];
extern const char *const pattern_names[PAT_N];
extern const char *const kwrite_names[KW_N];
extern const char *const vmode_names[V_N];
extern const char *const unprotect_names[UNPROT_N];
extern const char *const release_names[REL_N];

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
	enum unprotect unprotect;
	enum release release;
	uint64_t copy_ahead;    /* pages per fault window (1: the faulting page only) */
	uint64_t copy_run;      /* pages the copier claims at once */
	uint64_t release_mb;    /* --release chunk granularity */
	bool dry_run;           /* --dry-run: print the plan, run nothing */
	/* decided by the coordinator, not a flag: */
	uint64_t uffd_features; /* UFFDIO_API features every writer uffd asks for */
};

/* Bytes per page of RAM with backing b (the huge page size for hugetlbfs);
 * <= 0 when the kernel reports none. */
long backing_page_size(enum backing b);

/* A default of `units` 4 KiB pages in pages of psz bytes, at least one
 * (--copy-ahead and --copy-run are sizes by default: hugetlbfs gets 1). */
uint64_t default_pages(uint64_t units, long psz);

/* What main() does after parsing. */
enum action { ACT_RUN, ACT_SELF_TEST };

/*
 * Parse and check the command line into *o.  Usage errors exit 1 (die_usage);
 * --help prints and exits 0.  --self-test stops parsing where it stands and
 * returns ACT_SELF_TEST.
 */
enum action parse_options(int argc, char **argv, struct opts *o);

#endif
