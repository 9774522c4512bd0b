/* SPDX-License-Identifier: MIT */
/*
 * util.h - small helpers shared by the guest tools: clocks, error exits with
 * the documented exit codes, argument parsing, /proc readers, a JSON line
 * builder and a log-linear latency histogram.
 */
#ifndef UFFDLAB_UTIL_H
#define UFFDLAB_UTIL_H

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

/* Exit codes shared by every tool (documented in README.md). */
enum {
	EXIT_RAN = 0,          /* ran to the end, also when inconsistent */
	EXIT_USAGE = 1,        /* bad command line */
	EXIT_UNSUPPORTED = 2,  /* running kernel lacks a needed feature */
	EXIT_RUNTIME = 3,      /* a system call failed, a writer died, timeout */
};

/* ---- clocks ---- */
#define NSEC_PER_SEC 1000000000ULL
uint64_t now_ns(void);                 /* CLOCK_MONOTONIC, shared by processes */
void sleep_ns(uint64_t ns);
static inline struct timespec ns_to_timespec(uint64_t ns)
{
	return (struct timespec){ .tv_sec = (time_t)(ns / NSEC_PER_SEC),
				  .tv_nsec = (long)(ns % NSEC_PER_SEC) };
}
static inline double ns_to_ms(uint64_t ns) { return (double)ns / 1e6; }
static inline double ns_to_us(uint64_t ns) { return (double)ns / 1e3; }

/* ---- errors ----
 * Every fatal error prints one {"type":"error",...} JSON line on stdout and
 * a human message on stderr, runs the cleanup hook (kill writers, unlink
 * files) and exits with the given code.  In a forked writer process
 * util_set_child() turns this into "stderr only, _exit()" so the coordinator
 * stays the only JSON writer.
 */
extern const char *g_tool;
void util_set_cleanup(void (*fn)(void));
void util_set_child(bool child);

/*
 * One fatal report per process: the first thread (or signal handler) to
 * claim the exit reports and exits.  Returns CLAIM_NEW for that first
 * claim, CLAIM_MINE when this thread already holds it (a die from its own
 * cleanup, a signal while it reports), CLAIM_OTHER when another thread
 * does: leave the exit to it.  Async-signal-safe; die_*() claim it.
 */
enum { CLAIM_OTHER, CLAIM_MINE, CLAIM_NEW };
int util_claim_exit(void);
/* Signals whose handler reports a run's end: SIGINT, SIGTERM, SIGHUP.
 * Blocked while an error or a JSON line is written.  SIGALRM, the last
 * resort, is never blocked there. */
void util_fatal_sigset(sigset_t *set);
/* pthread_create() with those signals and SIGALRM blocked in the new
 * thread, so only the main thread handles them.  Returns 0 or an error
 * number. */
int thread_create_nosig(pthread_t *t, void *(*fn)(void *), void *arg);
/* "SIGTERM" for SIGTERM, NULL if unnamed.  Async-signal-safe. */
const char *signal_name(int sig);
/* How a child ended, for messages: "was killed by SIGTERM (signal 15)" or
 * "exited with status 3". */
void describe_exit(int status, char *buf, size_t len);

__attribute__((noreturn, format(printf, 2, 3)))
void die_usage(const char *flag, const char *fmt, ...);
__attribute__((noreturn, format(printf, 4, 5)))
void die_unsupported(const char *feature, const char *min_kernel,
		     const char *detail, const char *fmt, ...);
__attribute__((noreturn, format(printf, 1, 2)))
void die_runtime(const char *fmt, ...);
/* die_runtime() with ": <call> failed: <strerror(errno)>" appended. */
__attribute__((noreturn, format(printf, 2, 3)))
void die_sys(const char *call, const char *fmt, ...);

/* ---- argument parsing: return false on malformed input ---- */
bool parse_u64(const char *s, uint64_t *out);
bool parse_double(const char *s, double *out);
/* "64M", "1G", "4096", "2m" (K/M/G/T, powers of 1024). */
bool parse_size(const char *s, uint64_t *out);
void format_size(uint64_t bytes, char *buf, size_t len);

/* ---- /proc helpers ---- */
/* "VmRSS", "VmPTE", ... from /proc/PID/status (pid 0 = self); -1 if absent. */
long proc_status_kb(pid_t pid, const char *field);
/* One integer from a /proc/sys file; false if unreadable. */
bool read_long_file(const char *path, long *out);
/* "HugePages_Free" etc. from /proc/meminfo; -1 if absent. */
long meminfo_value(const char *field);
const char *kernel_release(void);

/* ---- JSON line builder ----
 * j_* calls append to a growable buffer and insert commas themselves; a
 * NULL key means "array element".  json_emit() writes the line to stdout
 * under a lock (the coordinator prints from two threads).
 */
struct json {
	char *buf;
	size_t len, cap;
	int depth;
	bool need_comma[32];
};
void j_init(struct json *j);
void j_free(struct json *j);
void j_obj_open(struct json *j, const char *key);
void j_obj_close(struct json *j);
void j_arr_open(struct json *j, const char *key);
void j_arr_close(struct json *j);
void j_str(struct json *j, const char *key, const char *val);  /* NULL -> null */
void j_int(struct json *j, const char *key, int64_t v);
void j_uint(struct json *j, const char *key, uint64_t v);
void j_dbl(struct json *j, const char *key, double v);          /* NaN -> null */
void j_bool(struct json *j, const char *key, bool v);
void j_null(struct json *j, const char *key);
void json_emit(struct json *j);   /* print line, then reset the buffer */

/* ---- latency histogram ----
 * Log-linear buckets in nanoseconds: 8 sub-buckets per power of two, so a
 * reported percentile is within ~12% of the true value.  Exact count, sum
 * and max are kept alongside.
 */
#define HIST_SUB_BITS 3
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS (64 * HIST_SUB)
struct hist {
	uint64_t count, sum, max, min;
	uint64_t b[HIST_BUCKETS];
};
void hist_init(struct hist *h);
void hist_add(struct hist *h, uint64_t ns);
uint64_t hist_quantile(const struct hist *h, double q);   /* ns */
/* {"count":..,"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"mean":..} in us */
void hist_json_summary(struct json *j, const char *key, const struct hist *h);
/* Compact form: power-of-two upper bounds in us and counts, empty ones left out. */
void hist_json_buckets(struct json *j, const char *key, const struct hist *h);

/* ---- misc ---- */
#define STR_(x) #x
#define STR(x) STR_(x)           /* a macro's value as a string literal */
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* 64-bit words in a bitmap of n bits. */
static inline size_t bitmap_words(uint64_t n)
{
	return (size_t)((n + 63) / 64);
}

static inline uint64_t rng_next(uint64_t *s)   /* xorshift64* */
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}
static inline uint64_t mix64(uint64_t x)       /* splitmix64 finaliser */
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}
void *xcalloc(size_t n, size_t size);  /* dies on failure */

#endif
