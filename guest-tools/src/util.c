/* SPDX-License-Identifier: MIT */
/* util.c - see util.h */
#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *g_tool = "uffd-tool";
static void (*g_cleanup)(void);
static bool g_child;
static pthread_mutex_t g_out_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int g_exit_owner;     /* tid reporting the fatal error, 0: none */

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

void sleep_ns(uint64_t ns)
{
	struct timespec ts = ns_to_timespec(ns);

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

int util_claim_exit(void)
{
	int me = (int)syscall(SYS_gettid);
	int owner = 0;

	if (atomic_compare_exchange_strong(&g_exit_owner, &owner, me))
		return CLAIM_NEW;
	return owner == me ? CLAIM_MINE : CLAIM_OTHER;
}

void util_fatal_sigset(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGHUP);
}

int thread_create_nosig(pthread_t *t, void *(*fn)(void *), void *arg)
{
	sigset_t fatal, old;
	int ret;

	util_fatal_sigset(&fatal);
	sigaddset(&fatal, SIGALRM);
	ret = pthread_sigmask(SIG_BLOCK, &fatal, &old);
	if (ret)
		return ret;
	ret = pthread_create(t, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return ret;
}

const char *signal_name(int sig)
{
	static const struct { int sig; const char *name; } names[] = {
		{ SIGHUP, "SIGHUP" }, { SIGINT, "SIGINT" }, { SIGQUIT, "SIGQUIT" },
		{ SIGILL, "SIGILL" }, { SIGTRAP, "SIGTRAP" }, { SIGABRT, "SIGABRT" },
		{ SIGBUS, "SIGBUS" }, { SIGFPE, "SIGFPE" }, { SIGKILL, "SIGKILL" },
		{ SIGUSR1, "SIGUSR1" }, { SIGSEGV, "SIGSEGV" }, { SIGUSR2, "SIGUSR2" },
		{ SIGPIPE, "SIGPIPE" }, { SIGALRM, "SIGALRM" }, { SIGTERM, "SIGTERM" },
		{ SIGCHLD, "SIGCHLD" }, { SIGCONT, "SIGCONT" }, { SIGSTOP, "SIGSTOP" },
		{ SIGTSTP, "SIGTSTP" }, { SIGTTIN, "SIGTTIN" }, { SIGTTOU, "SIGTTOU" },
		{ SIGURG, "SIGURG" }, { SIGXCPU, "SIGXCPU" }, { SIGXFSZ, "SIGXFSZ" },
		{ SIGVTALRM, "SIGVTALRM" }, { SIGPROF, "SIGPROF" }, { SIGWINCH, "SIGWINCH" },
		{ SIGIO, "SIGIO" }, { SIGPWR, "SIGPWR" }, { SIGSYS, "SIGSYS" },
	};

	for (size_t i = 0; i < ARRAY_SIZE(names); i++)
		if (names[i].sig == sig)
			return names[i].name;
	return NULL;
}

void describe_exit(int status, char *buf, size_t len)
{
	if (WIFSIGNALED(status)) {
		int sig = WTERMSIG(status);
		const char *name = signal_name(sig);

		if (name)
			snprintf(buf, len, "was killed by %s (signal %d)", name, sig);
		else
			snprintf(buf, len, "was killed by signal %d", sig);
	} else {
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
	}
}

void util_set_cleanup(void (*fn)(void)) { g_cleanup = fn; }
void util_set_child(bool child) { g_child = child; }

/* Print the error record and the stderr line, clean up, exit. */
static __attribute__((noreturn))
void die_common(int code, const char *kind, const char *flag,
		const char *feature, const char *min_kernel,
		const char *detail, const char *msg)
{
	sigset_t fatal;

	/* one error record: no signal report from this thread after it ... */
	util_fatal_sigset(&fatal);
	pthread_sigmask(SIG_BLOCK, &fatal, NULL);
	/* ... nor from another thread: if one is reporting, it also exits */
	if (util_claim_exit() == CLAIM_OTHER)
		for (;;)
			pause();
	fprintf(stderr, "%s: %s\n", g_tool, msg);
	if (!g_child) {
		struct json j;

		j_init(&j);
		j_obj_open(&j, NULL);
		j_str(&j, "type", "error");
		j_str(&j, "tool", g_tool);
		j_int(&j, "exit_code", code);
		j_str(&j, "kind", kind);
		j_str(&j, "message", msg);
		if (flag)
			j_str(&j, "flag", flag);
		if (feature) {
			j_str(&j, "feature", feature);
			j_str(&j, "min_kernel", min_kernel);
		}
		if (detail)
			j_str(&j, "detail", detail);
		j_obj_close(&j);
		json_emit(&j);
		j_free(&j);
	}
	if (g_cleanup) {
		void (*fn)(void) = g_cleanup;

		g_cleanup = NULL;     /* a failing cleanup must not recurse */
		fn();
	}
	fflush(stdout);
	if (g_child)
		_exit(code);
	exit(code);
}

void die_usage(const char *flag, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	die_common(EXIT_USAGE, "usage", flag, NULL, NULL, NULL, msg);
}

void die_unsupported(const char *feature, const char *min_kernel,
		     const char *detail, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	die_common(EXIT_UNSUPPORTED, "unsupported", NULL, feature, min_kernel,
		   detail, msg);
}

void die_runtime(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	die_common(EXIT_RUNTIME, "runtime", NULL, NULL, NULL, NULL, msg);
}

void die_sys(const char *call, const char *fmt, ...)
{
	char msg[1024];
	int err = errno;
	size_t n;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	n = strlen(msg);
	snprintf(msg + n, sizeof(msg) - n, ": %s failed: %s (errno %d)",
		 call, strerror(err), err);
	die_common(EXIT_RUNTIME, "runtime", NULL, NULL, NULL, NULL, msg);
}

/* ---- parsing ---- */

bool parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!s || !isdigit((unsigned char)*s))
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end)
		return false;
	*out = v;
	return true;
}

bool parse_double(const char *s, double *out)
{
	char *end;
	double v;

	if (!s || !*s || isspace((unsigned char)*s))
		return false;
	errno = 0;
	v = strtod(s, &end);
	if (errno || *end || !isfinite(v))
		return false;
	*out = v;
	return true;
}

bool parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	if (!s || !isdigit((unsigned char)*s))
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return false;
	switch (toupper((unsigned char)*end)) {
	case 0: break;
	case 'K': shift = 10; end++; break;
	case 'M': shift = 20; end++; break;
	case 'G': shift = 30; end++; break;
	case 'T': shift = 40; end++; break;
	default: return false;
	}
	if (*end == 'i' || *end == 'B')   /* accept 64MiB, 64MB */
		end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
	if (*end)
		return false;
	if (shift && v > (UINT64_MAX >> shift))
		return false;
	*out = (uint64_t)v << shift;
	return true;
}

void format_size(uint64_t b, char *buf, size_t len)
{
	if (b >= (1ULL << 30) && !(b & ((1ULL << 30) - 1)))
		snprintf(buf, len, "%" PRIu64 "G", b >> 30);
	else if (b >= (1ULL << 20) && !(b & ((1ULL << 20) - 1)))
		snprintf(buf, len, "%" PRIu64 "M", b >> 20);
	else if (b >= (1ULL << 10) && !(b & ((1ULL << 10) - 1)))
		snprintf(buf, len, "%" PRIu64 "K", b >> 10);
	else
		snprintf(buf, len, "%" PRIu64, b);
}

/* ---- /proc ---- */

/* The number after "FIELD:" in a /proc file such as status or meminfo, or -1. */
static long proc_file_field(const char *path, const char *field)
{
	char line[256];
	size_t flen = strlen(field);
	long val = -1;
	FILE *f = fopen(path, "re");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, field, flen) && line[flen] == ':') {
			val = strtol(line + flen + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return val;
}

long proc_status_kb(pid_t pid, const char *field)
{
	char path[64];

	if (pid)
		snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	else
		snprintf(path, sizeof(path), "/proc/self/status");
	return proc_file_field(path, field);
}

bool read_long_file(const char *path, long *out)
{
	FILE *f = fopen(path, "re");
	bool ok;

	if (!f)
		return false;
	ok = fscanf(f, "%ld", out) == 1;
	fclose(f);
	return ok;
}

long meminfo_value(const char *field)
{
	return proc_file_field("/proc/meminfo", field);
}

const char *kernel_release(void)
{
	static struct utsname u;
	static bool done;

	if (!done) {
		if (uname(&u))
			snprintf(u.release, sizeof(u.release), "unknown");
		done = true;
	}
	return u.release;
}

/* ---- JSON ---- */

void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n, size);

	if (!p && n && size)
		die_runtime("out of memory allocating %zu x %zu bytes", n, size);
	return p;
}

void j_init(struct json *j)
{
	memset(j, 0, sizeof(*j));
}

void j_free(struct json *j)
{
	free(j->buf);
	memset(j, 0, sizeof(*j));
}

static void j_putn(struct json *j, const char *s, size_t n)
{
	if (j->len + n + 1 > j->cap) {
		size_t cap = j->cap ? j->cap : 256;
		char *nb;

		while (cap < j->len + n + 1)
			cap *= 2;
		nb = realloc(j->buf, cap);
		if (!nb) {
			fprintf(stderr, "%s: out of memory building JSON\n", g_tool);
			_exit(EXIT_RUNTIME);
		}
		j->buf = nb;
		j->cap = cap;
	}
	memcpy(j->buf + j->len, s, n);
	j->len += n;
	j->buf[j->len] = 0;
}

static void j_puts(struct json *j, const char *s) { j_putn(j, s, strlen(s)); }

static void j_quoted(struct json *j, const char *s)
{
	j_putn(j, "\"", 1);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		char esc[8];

		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			j_putn(j, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			j_puts(j, esc);
		} else {
			j_putn(j, (const char *)&c, 1);
		}
	}
	j_putn(j, "\"", 1);
}

/* Comma and "key": before a value. */
static void j_prefix(struct json *j, const char *key)
{
	if (j->depth > 0) {
		if (j->need_comma[j->depth])
			j_putn(j, ",", 1);
		j->need_comma[j->depth] = true;
	}
	if (key) {
		j_quoted(j, key);
		j_putn(j, ":", 1);
	}
}

static void j_open(struct json *j, const char *key, const char *br)
{
	j_prefix(j, key);
	j_puts(j, br);
	if (j->depth < 31)
		j->depth++;
	j->need_comma[j->depth] = false;
}

void j_obj_open(struct json *j, const char *key) { j_open(j, key, "{"); }
void j_arr_open(struct json *j, const char *key) { j_open(j, key, "["); }
void j_obj_close(struct json *j) { j->depth--; j_puts(j, "}"); }
void j_arr_close(struct json *j) { j->depth--; j_puts(j, "]"); }

void j_str(struct json *j, const char *key, const char *val)
{
	j_prefix(j, key);
	if (val)
		j_quoted(j, val);
	else
		j_puts(j, "null");
}

void j_int(struct json *j, const char *key, int64_t v)
{
	char b[32];

	j_prefix(j, key);
	snprintf(b, sizeof(b), "%" PRId64, v);
	j_puts(j, b);
}

void j_uint(struct json *j, const char *key, uint64_t v)
{
	char b[32];

	j_prefix(j, key);
	snprintf(b, sizeof(b), "%" PRIu64, v);
	j_puts(j, b);
}

void j_dbl(struct json *j, const char *key, double v)
{
	char b[64];
	char *p;

	j_prefix(j, key);
	if (!isfinite(v)) {
		j_puts(j, "null");
		return;
	}
	snprintf(b, sizeof(b), "%.3f", v);
	/* trim trailing zeros: 12.500 -> 12.5, 3.000 -> 3 */
	p = b + strlen(b) - 1;
	while (*p == '0')
		*p-- = 0;
	if (*p == '.')
		*p = 0;
	if (!strcmp(b, "-0"))
		strcpy(b, "0");
	j_puts(j, b);
}

void j_bool(struct json *j, const char *key, bool v)
{
	j_prefix(j, key);
	j_puts(j, v ? "true" : "false");
}

void j_null(struct json *j, const char *key)
{
	j_prefix(j, key);
	j_puts(j, "null");
}

void json_emit(struct json *j)
{
	sigset_t fatal, old;

	/* a signal report written mid-line would break the JSON Lines */
	util_fatal_sigset(&fatal);
	pthread_sigmask(SIG_BLOCK, &fatal, &old);
	pthread_mutex_lock(&g_out_lock);
	fwrite(j->buf ? j->buf : "", 1, j->len, stdout);
	fputc('\n', stdout);
	fflush(stdout);
	pthread_mutex_unlock(&g_out_lock);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	j->len = 0;
	j->depth = 0;
	if (j->buf)
		j->buf[0] = 0;
	memset(j->need_comma, 0, sizeof(j->need_comma));
}

/* ---- histogram ---- */

void hist_init(struct hist *h)
{
	memset(h, 0, sizeof(*h));
	h->min = UINT64_MAX;
}

static unsigned hist_index(uint64_t v)
{
	unsigned k;

	if (v < HIST_SUB)
		return (unsigned)v;
	k = 63u - (unsigned)__builtin_clzll(v);            /* k >= HIST_SUB_BITS */
	return (k - HIST_SUB_BITS + 1) * HIST_SUB +
	       (unsigned)((v >> (k - HIST_SUB_BITS)) & (HIST_SUB - 1));
}

/* Smallest and largest value that land in bucket i. */
static void hist_bounds(unsigned i, uint64_t *lo, uint64_t *hi)
{
	unsigned k, sub;

	if (i < HIST_SUB) {
		*lo = *hi = i;
		return;
	}
	k = i / HIST_SUB + HIST_SUB_BITS - 1;
	sub = i % HIST_SUB;
	*lo = ((uint64_t)(HIST_SUB + sub)) << (k - HIST_SUB_BITS);
	*hi = *lo + (1ULL << (k - HIST_SUB_BITS)) - 1;
}

void hist_add(struct hist *h, uint64_t ns)
{
	h->b[hist_index(ns)]++;
	h->count++;
	h->sum += ns;
	if (ns > h->max)
		h->max = ns;
	if (ns < h->min)
		h->min = ns;
}

uint64_t hist_quantile(const struct hist *h, double q)
{
	uint64_t rank, seen = 0;

	if (!h->count)
		return 0;
	rank = (uint64_t)ceil(q * (double)h->count);
	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += h->b[i];
		if (seen >= rank) {
			uint64_t lo, hi, mid;

			hist_bounds(i, &lo, &hi);
			mid = lo + (hi - lo) / 2;
			/* clamp to what was really observed */
			if (mid > h->max)
				mid = h->max;
			if (mid < h->min)
				mid = h->min;
			return mid;
		}
	}
	return h->max;
}

void hist_json_summary(struct json *j, const char *key, const struct hist *h)
{
	j_obj_open(j, key);
	j_uint(j, "count", h->count);
	if (h->count) {
		j_dbl(j, "p50", ns_to_us(hist_quantile(h, 0.50)));
		j_dbl(j, "p90", ns_to_us(hist_quantile(h, 0.90)));
		j_dbl(j, "p99", ns_to_us(hist_quantile(h, 0.99)));
		j_dbl(j, "p999", ns_to_us(hist_quantile(h, 0.999)));
		j_dbl(j, "max", ns_to_us(h->max));
		j_dbl(j, "mean", ns_to_us(h->sum / h->count));
	} else {
		j_null(j, "p50");
		j_null(j, "p90");
		j_null(j, "p99");
		j_null(j, "p999");
		j_null(j, "max");
		j_null(j, "mean");
	}
	j_obj_close(j);
}

void hist_json_buckets(struct json *j, const char *key, const struct hist *h)
{
	/* Merge the sub-buckets of each power of two: bucket k holds
	 * values in [2^(k-1), 2^k) ns and is reported by its upper bound. */
	uint64_t pow2[65] = { 0 };

	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		uint64_t lo, hi;

		if (!h->b[i])
			continue;
		hist_bounds(i, &lo, &hi);
		pow2[lo ? 64 - __builtin_clzll(lo) : 0] += h->b[i];
	}
	j_obj_open(j, key);
	j_arr_open(j, "bounds_us");
	for (unsigned k = 0; k < 64; k++)
		if (pow2[k])
			j_dbl(j, NULL, ns_to_us(1ULL << k));
	j_arr_close(j);
	j_arr_open(j, "counts");
	for (unsigned k = 0; k < 64; k++)
		if (pow2[k])
			j_uint(j, NULL, pow2[k]);
	j_arr_close(j);
	j_obj_close(j);
}
