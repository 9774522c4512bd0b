/* SPDX-License-Identifier: MIT */
/* coord.c - see coord.h */
#include "coord.h"
#include "ctl.h"
#include "util.h"

#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define ALIVE_CHECK_NS 2000000ULL   /* reap writers at most this often */

static struct coord *g_coord;     /* for the cleanup hook and signal handler */

/* ---- no writer outlives the coordinator ---- */

static void kill_writers(void)
{
	struct coord *c = g_coord;

	if (!c)
		return;
	for (int i = 0; i < c->o->writers; i++)
		if (c->wpid[i] > 0)
			kill(c->wpid[i], SIGKILL);
	if (c->child_pid > 0)
		kill(c->child_pid, SIGKILL);
}

static void reap_writers(void)
{
	struct coord *c = g_coord;

	for (int i = 0; c && i < c->o->writers; i++) {
		if (c->wpid[i] > 0) {
			waitpid(c->wpid[i], NULL, 0);
			c->wpid[i] = 0;
		}
	}
}

static void coord_cleanup(void)
{
	kill_writers();
	reap_writers();
}

/* Async-signal-safe string append for the signal handler. */
static size_t append(char *buf, size_t n, size_t cap, const char *s)
{
	while (*s && n + 1 < cap)
		buf[n++] = *s++;
	buf[n] = 0;
	return n;
}

/* SIGINT/SIGTERM/SIGHUP (a user, or a terminal signalling the whole group)
 * and SIGALRM (the hard timeout).  Only async-signal-safe calls here.
 * Writers reset these to the default action, so when the group gets the
 * signal they die silently and this is the one report. */
static void on_fatal_signal(int sig)
{
	const char *name = signal_name(sig);
	char msg[160], line[320];
	size_t n = 0, m = 0;
	ssize_t r;

	if (util_claim_exit() != CLAIM_NEW) {
		/* an error is being reported already; its exit follows, unless
		 * the alarm says it got stuck: then end it without a second record */
		if (sig != SIGALRM)
			return;
		kill_writers();
		_exit(EXIT_RUNTIME);
	}
	kill_writers();
	if (sig == SIGALRM) {
		n = append(msg, n, sizeof(msg), "hard timeout (--timeout plus "
			   STR(TIMEOUT_GRACE_MS) " ms) expired; writers killed");
	} else {
		n = append(msg, n, sizeof(msg), "coordinator interrupted by ");
		n = append(msg, n, sizeof(msg), name ? name : "a signal");
		n = append(msg, n, sizeof(msg), "; writers killed");
	}
	/* exit_code: EXIT_RUNTIME */
	m = append(line, m, sizeof(line), "{\"type\":\"error\",\"tool\":\"" SNAPSHOT_TOOL "\","
		   "\"exit_code\":3,\"kind\":\"runtime\",\"message\":\"");
	m = append(line, m, sizeof(line), msg);
	m = append(line, m, sizeof(line), "\"}\n");
	r = write(STDOUT_FILENO, line, m);
	m = append(line, 0, sizeof(line), SNAPSHOT_TOOL ": ");
	m = append(line, m, sizeof(line), msg);
	m = append(line, m, sizeof(line), "\n");
	r = write(STDERR_FILENO, line, m);
	(void)r;
	_exit(EXIT_RUNTIME);
}

static void install_signals(const struct opts *o)
{
	uint64_t ms = (uint64_t)(o->timeout * 1000) + TIMEOUT_GRACE_MS;
	struct itimerval it = { .it_value = { .tv_sec = (time_t)(ms / 1000),
					      .tv_usec = (suseconds_t)(ms % 1000) * 1000 } };
	struct sigaction sa;
	sigset_t fatal;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_fatal_signal;
	util_fatal_sigset(&fatal);
	sigaddset(&fatal, SIGALRM);
	sa.sa_mask = fatal;        /* one handler at a time */
	if (sigaction(SIGTERM, &sa, NULL) || sigaction(SIGINT, &sa, NULL) ||
	    sigaction(SIGHUP, &sa, NULL) || sigaction(SIGALRM, &sa, NULL))
		die_sys("sigaction", "installing the signal handlers");
	if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
		die_sys("signal(SIGPIPE)", "ignoring SIGPIPE");
	/* last resort if a loop ever forgets to check the deadline */
	if (setitimer(ITIMER_REAL, &it, NULL))
		die_sys("setitimer", "arming the hard timeout");
}

void coord_guard(struct coord *c)
{
	g_coord = c;
	install_signals(c->o);
	util_set_cleanup(coord_cleanup);
}

void coord_unguard(void)
{
	util_set_cleanup(NULL);
	g_coord = NULL;
}

/* ---- liveness, deadline ---- */

static void check_writers(struct coord *c)
{
	for (int i = 0; i < c->o->writers; i++) {
		pid_t pid = c->wpid[i];
		int status;
		char how[96];
		const char *err;

		if (pid <= 0 || waitpid(pid, &status, WNOHANG) != pid)
			continue;
		c->wpid[i] = 0;
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
		    atomic_load(&c->ctl->slot[i].state) == SLOT_DONE)
			continue;    /* finished normally after CMD_STOP */
		describe_exit(status, how, sizeof(how));
		err = c->ctl->slot[i].error;
		die_runtime("writer %d (pid %d) %s while %s%s%s", i, (int)pid, how, c->doing,
			    err[0] ? ": " : "", err);
	}
}

void coord_check(struct coord *c)
{
	uint64_t t = now_ns();

	if (atomic_load(&c->herr))
		die_runtime("fault handler: %s", c->herr_msg);
	if (t > c->deadline)
		die_runtime("timed out after %.3g s (--timeout %.3g) while %s",
			    (double)(t - c->t_start) / 1e9, c->o->timeout, c->doing);
	if (t - c->last_alive_check > ALIVE_CHECK_NS) {
		c->last_alive_check = t;
		check_writers(c);
	}
}

/* ---- counters ---- */

uint64_t coord_total_ops(struct coord *c)
{
	uint64_t sum = 0;

	for (int i = 0; i < c->npart; i++)
		sum += atomic_load_explicit(&c->ctl->slot[i].ops, memory_order_relaxed);
	return sum;
}

uint64_t coord_total_faults(struct coord *c)
{
	uint64_t sum = 0;

	for (int i = 0; i < c->nproc; i++)
		sum += atomic_load(&c->proc[i].faults);
	return sum;
}

void coord_mem(struct coord *c, int64_t *rss, int64_t *pte)
{
	*rss = 0;
	*pte = 0;
	for (int i = 0; i < c->nproc; i++) {
		long r = proc_status_kb(c->proc[i].pid, "VmRSS");
		long p = proc_status_kb(c->proc[i].pid, "VmPTE");

		*rss += r > 0 ? r : 0;
		*pte += p > 0 ? p : 0;
	}
}

/* ---- commands ---- */

void pause_all(struct coord *c)
{
	uint32_t seq = ctl_pause(c->ctl);
	unsigned spins = 0;

	c->doing = "pausing writers";
	while (!ctl_all_paused(c->ctl, c->npart, seq)) {
		/* writers blocked in a fault finish once the handler serves it */
		if (++spins % 64 == 0)
			coord_check(c);
		sched_yield();
	}
}

void resume_all(struct coord *c)
{
	ctl_command(c->ctl, CMD_RUN);
}

void stop_all(struct coord *c)
{
	ctl_command(c->ctl, CMD_STOP);
	c->doing = "stopping writers";
	if (c->o->backing == B_ANON) {
		for (int i = 0; i < c->o->writers; i++)
			pthread_join(c->wthread[i], NULL);
		return;
	}
	for (int i = 0; i < c->o->writers; i++) {
		while (c->wpid[i] > 0) {
			coord_check(c);     /* reaps and judges exits */
			c->last_alive_check = 0;
			sleep_ns(200000);
		}
	}
}
