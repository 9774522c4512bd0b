/* SPDX-License-Identifier: MIT */
/*
 * limits.h - numeric limits of uffd-snapshot's options, the one source.
 *
 * snapshot_main.c parses every option against these macros, and the host
 * (uffdlab) reads this file with the regex
 * ^#define\s+LIM_([A-Z0-9_]+)_(MIN|MAX)\s+(\S+) to check a run's parameters
 * before any VM boots.  So keep every limit a "#define LIM_<NAME>_MIN|MAX
 * <value>" line whose value is a plain C numeric literal (no suffix, cast,
 * parentheses or expression), and keep comments on lines of their own.
 * Limits are inclusive unless the comment above them says otherwise.
 */
#ifndef UFFDLAB_LIMITS_H
#define UFFDLAB_LIMITS_H

/* --duration SECONDS */
#define LIM_DURATION_MIN 0.05
#define LIM_DURATION_MAX 86400

/* --rate OPS: combined page writes per second (or the word "max") */
#define LIM_RATE_MIN 1
#define LIM_RATE_MAX 1e9

/* --timeout SECONDS */
#define LIM_TIMEOUT_MIN 0.1
#define LIM_TIMEOUT_MAX 86400

/* --warmup SECONDS (and less than --duration) */
#define LIM_WARMUP_MIN 0
#define LIM_WARMUP_MAX 86400

/* --writers N; also sizes the control block (MAX_WRITERS) */
#define LIM_WRITERS_MIN 1
#define LIM_WRITERS_MAX 64

/* --unregistered K (and at most --writers) */
#define LIM_UNREGISTERED_MIN 0
#define LIM_UNREGISTERED_MAX 64

/* --stagger-ms MS */
#define LIM_STAGGER_MS_MIN 0
#define LIM_STAGGER_MS_MAX 10000

/* --pattern hot:FRACTION: exclusive minimum, FRACTION > MIN and <= MAX */
#define LIM_HOT_FRACTION_MIN 0
#define LIM_HOT_FRACTION_MAX 1

/* --seed N */
#define LIM_SEED_MIN 0
#define LIM_SEED_MAX 2147483647

/* --size in pages (huge pages for hugetlbfs), and a multiple of the page size */
#define LIM_SIZE_PAGES_MIN 16
#define LIM_SIZE_PAGES_MAX 4294967295

/* --corrupt-snapshot N (and at most the number of pages) */
#define LIM_CORRUPT_SNAPSHOT_MIN 1
#define LIM_CORRUPT_SNAPSHOT_MAX 4294967295

/* --progress-ms MS */
#define LIM_PROGRESS_MS_MIN 10
#define LIM_PROGRESS_MS_MAX 60000

/* --copy-ahead PAGES: pages copied and un-protected per fault (1 = only the faulting one) */
#define LIM_COPY_AHEAD_MIN 1
#define LIM_COPY_AHEAD_MAX 512

/* --copy-run PAGES: pages the background copier claims at once */
#define LIM_COPY_RUN_MIN 1
#define LIM_COPY_RUN_MAX 4096

/* --release-mb MB: --release chunk un-protects copied RAM every this many MiB */
#define LIM_RELEASE_MB_MIN 1
#define LIM_RELEASE_MB_MAX 1024

/* --scan-rounds N; also sizes the per-round report */
#define LIM_SCAN_ROUNDS_MIN 1
#define LIM_SCAN_ROUNDS_MAX 64

#endif
