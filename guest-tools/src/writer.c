/* SPDX-License-Identifier: MIT */
/* writer.c - see writer.h */
#include "writer.h"
#include "ctl.h"
#include "options.h"
#include "stamp.h"
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define STALL_NS 10000          /* an op slower than 10 us counts as a stall */
#define DEBT_CAP_NS 10000000ULL /* after a long stall, catch up at most 10 ms of writes */
#define SLEEP_MIN_NS 200000     /* ahead of the rate by more than this: sleep */

/* Process mode: fds a fork child must not keep (see spawn_fork_child). */
static int g_own_uffd = -1, g_own_sock = -1;

/* A writer that cannot go on records why, then exits; the coordinator sees
 * the death and reports the message. */
static __attribute__((noreturn, format(printf, 2, 3)))
void writer_fail(struct wctx *w, const char *fmt, ...)
{
	struct slot *s = &w->ctl->slot[w->id];
	int err = errno;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(s->error, sizeof(s->error), fmt, ap);
	va_end(ap);
	if (err) {
		size_t n = strlen(s->error);

		snprintf(s->error + n, sizeof(s->error) - n, ": %s (errno %d)",
			 strerror(err), err);
	}
	atomic_store(&s->state, SLOT_FAILED);
	fprintf(stderr, SNAPSHOT_TOOL ": writer %d: %s\n", w->id, s->error);
	if (w->o->backing == B_ANON)   /* a thread: take the whole run down */
		die_runtime("writer %d: %s", w->id, s->error);
	_exit(EXIT_RUNTIME);
}

/* ---- stall accounting ---- */

struct wstats {
	uint64_t stall_max, stall_total, stall_count, pause_max, pause_total;
};

static void account_stall(struct wstats *st, uint64_t d)
{
	if (d < STALL_NS)
		return;
	st->stall_total += d;
	st->stall_count++;
	if (d > st->stall_max)
		st->stall_max = d;
}

/* ---- page choice ---- */

void writer_seed(struct wctx *w)
{
	w->rng = mix64(w->o->seed * 0x9E3779B97F4A7C15ULL + (uint64_t)w->id + 1);
	w->cursor = w->npages * (uint64_t)w->id / (uint64_t)w->o->writers;
}

static uint64_t pick_page(struct wctx *w)
{
	uint64_t n = w->npages, hot;

	switch (w->o->pattern) {
	case PAT_SEQUENTIAL:
		return w->cursor++ % n;
	case PAT_HOT:
		/* 90% of writes hit the first hot_fraction of RAM */
		hot = (uint64_t)(w->o->hot_fraction * (double)n);
		if (hot < 1)
			hot = 1;
		if (rng_next(&w->rng) % 10 < 9)
			return rng_next(&w->rng) % hot;
		return rng_next(&w->rng) % n;
	case PAT_UNIFORM:
	default:
		return rng_next(&w->rng) % n;
	}
}

/* ---- one page write ---- */

static enum stamp_how writer_how(const struct wctx *w)
{
	if (w->id != 0)
		return HOW_STORE;
	if (w->o->fd_writes)
		return HOW_PWRITE;
	if (w->o->kernel_writes == KW_READ)
		return HOW_KREAD;
	if (w->o->kernel_writes == KW_PVW)
		return HOW_KPVW;
	return HOW_STORE;
}

/* Kernel-mode write of one stamp word: true if it landed, false on EFAULT. */
static bool kernel_write(struct wctx *w, enum stamp_how how, uint64_t *dst, uint64_t word)
{
	struct slot *s = &w->ctl->slot[w->id];
	ssize_t n;

	s->kw_attempted++;
	if (how == HOW_KREAD) {
		uint64_t drain;

		if (write(w->pipefd[1], &word, sizeof(word)) != sizeof(word))
			writer_fail(w, "write(pipe) for --kernel-writes read");
		n = read(w->pipefd[0], dst, sizeof(word));
		if (n < 0 && errno == EFAULT) {
			/* the pipe keeps the data after EFAULT: drain it */
			if (read(w->pipefd[0], &drain, sizeof(drain)) != sizeof(drain))
				writer_fail(w, "draining the pipe after EFAULT");
			errno = EFAULT;
		}
	} else {
		struct iovec local = { .iov_base = &word, .iov_len = sizeof(word) };
		struct iovec remote = { .iov_base = dst, .iov_len = sizeof(word) };

		n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
	}
	if (n == sizeof(word)) {
		s->kw_ok++;
		return true;
	}
	if (n < 0 && errno == EFAULT) {
		s->kw_efault++;
		return false;
	}
	writer_fail(w, "%s into the mapping returned %zd",
		    how == HOW_KREAD ? "read(2)" : "process_vm_writev(2)", n);
}

static void mark_written(struct wctx *w, uint64_t page)
{
	_Atomic uint64_t *word = &w->ctl->written[page / 64];
	uint64_t bit = 1ULL << (page % 64);

	if (!(atomic_load_explicit(word, memory_order_relaxed) & bit))
		atomic_fetch_or(word, bit);
}

/* Write one stamp word into this writer's slot of `page`; time it and
 * publish the start for the fault handler's latency figure. */
static void write_page(struct wctx *w, struct wstats *st, uint64_t page,
		       uint32_t epoch, uint64_t seq, enum stamp_how how)
{
	struct slot *s = &w->ctl->slot[w->id];
	size_t off = page * w->psz + 8 * (size_t)w->id;
	uint64_t *dst = (uint64_t *)(w->ram + off);
	uint64_t word = stamp_word(page, (unsigned)w->id, how, epoch, seq);
	bool landed = true;
	uint64_t t0, t1;

	t0 = now_ns();
	atomic_store_explicit(&s->op_start_ns, t0, memory_order_release);
	switch (how) {
	case HOW_PWRITE:
		if (pwrite(w->fd, &word, sizeof(word), (off_t)off) != sizeof(word))
			writer_fail(w, "pwrite(fd) of page %llu", (unsigned long long)page);
		break;
	case HOW_KREAD:
	case HOW_KPVW:
		landed = kernel_write(w, how, dst, word);
		break;
	default:
		/* one atomic 8-byte store: faults here when protected */
		atomic_store_explicit((_Atomic uint64_t *)dst, word, memory_order_relaxed);
		break;
	}
	t1 = now_ns();
	account_stall(st, t1 - t0);
	if (landed && !w->o->prefill)
		mark_written(w, page);
	atomic_store_explicit(&s->ops, atomic_load_explicit(&s->ops, memory_order_relaxed) + 1,
			      memory_order_relaxed);
	if (epoch > 0)
		atomic_fetch_add_explicit(&s->post_ops, 1, memory_order_release);
}

/* ---- one-shot injections right after the instant (writer 0) ---- */

/* How many pages an injection touches: INJECT_PAGES, or all of a tiny RAM. */
static uint64_t inject_pages(const struct wctx *w)
{
	return w->npages < INJECT_PAGES ? w->npages : INJECT_PAGES;
}

static uint64_t inject_first_page(struct wctx *w)
{
	return rng_next(&w->rng) % (w->npages - inject_pages(w) + 1);
}

static void inject_punch(struct wctx *w)
{
	struct slot *s = &w->ctl->slot[w->id];
	uint64_t n = inject_pages(w);
	uint64_t first = inject_first_page(w);

	s->punch_first = first;
	s->punch_pages = n;
	/* before the punch changes anything: the coordinator's copies that
	 * still see 0 here after copying read the pages as they were */
	atomic_store(&s->punch_started, 1);
	if (fallocate(w->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)(first * w->psz), (off_t)(n * w->psz)))
		writer_fail(w, "fallocate(PUNCH_HOLE) for --punch-hole");
}

static void inject_zap(struct wctx *w, struct wstats *st, uint32_t epoch, uint64_t *seq)
{
	struct slot *s = &w->ctl->slot[w->id];
	uint64_t n = inject_pages(w);
	uint64_t first = inject_first_page(w);
	uint8_t *addr = w->ram + first * w->psz;

	s->zap_first = first;
	s->zap_pages = (int64_t)n;
	s->zap_wp_before = pagemap_count_wp(0, (uintptr_t)addr, n * w->psz, w->psz);
	if (madvise(addr, n * w->psz, MADV_DONTNEED))
		writer_fail(w, "madvise(MADV_DONTNEED) for --zap-after-arm");
	s->zap_wp_after = pagemap_count_wp(0, (uintptr_t)addr, n * w->psz, w->psz);
	/* then write every zapped page: each write must fault */
	for (uint64_t i = 0; i < n; i++)
		write_page(w, st, first + i, epoch, ++*seq, HOW_STORE);
}

static void run_injections(struct wctx *w, struct wstats *st, uint32_t epoch, uint64_t *seq)
{
	if (w->o->punch_hole)
		inject_punch(w);
	if (w->o->zap_after_arm)
		inject_zap(w, st, epoch, seq);
	atomic_store_explicit(&w->ctl->slot[w->id].inject_done, 1, memory_order_release);
}

/* ---- pause / resume ---- */

static uint32_t do_pause(struct wctx *w, struct wstats *st)
{
	struct ctl *c = w->ctl;
	struct slot *s = &c->slot[w->id];
	uint64_t t0 = now_ns(), d, ref;

	atomic_store_explicit(&s->pause_ack, atomic_load(&c->pause_seq), memory_order_release);
	for (;;) {
		uint32_t gen = atomic_load(&c->cmd_gen);

		if (atomic_load(&c->cmd) != CMD_PAUSE)
			break;
		ctl_wait(c, gen, CMD_POLL_NS);
	}
	d = now_ns() - t0;
	ref = atomic_load(&c->ref_ns);      /* the verifier's copy is not a stall */
	d = d > ref ? d - ref : 0;
	st->pause_total += d;
	if (d > st->pause_max)
		st->pause_max = d;
	account_stall(st, d);
	return atomic_load(&c->epoch);
}

/* Writer 0 watches its fork child: a dead child ends the run. */
static void check_child(struct wctx *w)
{
	pid_t pid = w->child;
	char how[96];
	int status;

	if (pid > 0 && waitpid(pid, &status, WNOHANG) == pid) {
		errno = 0;
		w->child = 0;
		describe_exit(status, how, sizeof(how));
		writer_fail(w, "fork child (pid %d) %s", (int)pid, how);
	}
}

void writer_loop(struct wctx *w)
{
	struct ctl *c = w->ctl;
	struct slot *s = &c->slot[w->id];
	int nwriters = w->o->writers;
	uint64_t interval = 0, next, seq = 0, t;
	enum stamp_how how = writer_how(w);
	bool injected = !(w->id == 0 && (w->o->punch_hole || w->o->zap_after_arm));
	struct wstats st = { 0 };
	uint32_t epoch;

	atomic_store(&s->tid, (int32_t)syscall(SYS_gettid));
	atomic_store(&s->state, SLOT_READY);
	while (atomic_load(&c->cmd) == CMD_SETUP) {
		uint32_t gen = atomic_load(&c->cmd_gen);

		if (atomic_load(&c->cmd) != CMD_SETUP)
			break;
		ctl_wait(c, gen, CMD_POLL_NS);
	}
	atomic_store(&s->state, SLOT_RUNNING);
	epoch = atomic_load(&c->epoch);
	if (w->o->rate > 0)
		/* rate is combined, and >= LIM_RATE_MIN: at most 64e9 ns, no overflow */
		interval = (uint64_t)(1e9 * nwriters / w->o->rate);
	next = now_ns();

	for (;;) {
		uint32_t gen = atomic_load_explicit(&c->cmd_gen, memory_order_acquire);
		uint32_t cmd = atomic_load_explicit(&c->cmd, memory_order_acquire);

		if (cmd == CMD_STOP)
			break;
		if (cmd == CMD_PAUSE) {
			epoch = do_pause(w, &st);
			check_child(w);
			continue;
		}
		if (interval) {
			t = now_ns();
			if (next > t + SLEEP_MIN_NS) {  /* ahead: sleep, but wake on commands */
				ctl_wait(c, gen, next - t);
				continue;
			}
			if (t > next + DEBT_CAP_NS)     /* after a long stall, no endless burst */
				next = t - DEBT_CAP_NS;
			next += interval;
		}
		if (!injected && epoch > 0) {
			run_injections(w, &st, epoch, &seq);
			injected = true;
		}
		write_page(w, &st, pick_page(w), epoch, ++seq, how);
		if (w->child > 0 && (seq & 4095) == 0)
			check_child(w);
	}
	s->stall_max_ns = st.stall_max;
	s->stall_total_ns = st.stall_total;
	s->stall_count = st.stall_count;
	s->pause_max_ns = st.pause_max;
	s->pause_total_ns = st.pause_total;
	atomic_store_explicit(&s->state, SLOT_DONE, memory_order_release);
}

/* ---- process mode ---- */

/* Setup failed: tell the coordinator why (it prints the error) and exit. */
static __attribute__((noreturn, format(printf, 4, 5)))
void hello_fail(int sock, struct hello *h, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(h->msg, sizeof(h->msg), fmt, ap);
	va_end(ap);
	h->ok = 0;
	h->exit_code = code;
	hello_send(sock, h, -1);
	_exit(code);
}

/* Own uffd on the writer's own mm: open, API, register WP. */
static int writer_uffd(const struct opts *o, int sock, struct hello *h,
		       void *ram, size_t size)
{
	uint64_t ioctls = 0;
	int uffd, ret;

	uffd = uffd_open(o->uffd_source);
	if (uffd < 0)
		hello_fail(sock, h, EXIT_RUNTIME, "writer %d: userfaultfd (%s) failed: %s (errno %d)",
			   h->id, uffd_source_names[o->uffd_source], strerror(-uffd), -uffd);
	ret = uffd_api(uffd, o->uffd_features, NULL, NULL);
	if (ret)
		hello_fail(sock, h, ret == -EOPNOTSUPP ? EXIT_UNSUPPORTED : EXIT_RUNTIME,
			   "writer %d: ioctl(UFFDIO_API, features 0x%llx) failed: %s (errno %d)",
			   h->id, (unsigned long long)o->uffd_features, strerror(-ret), -ret);
	ret = uffd_register(uffd, ram, size, UFFDIO_REGISTER_MODE_WP, &ioctls);
	if (ret)
		hello_fail(sock, h, EXIT_RUNTIME,
			   "writer %d: ioctl(UFFDIO_REGISTER, MODE_WP) on %s failed: %s (errno %d)",
			   h->id, backing_names[o->backing], strerror(-ret), -ret);
	if (!(ioctls & (1ULL << _UFFDIO_WRITEPROTECT)))
		hello_fail(sock, h, EXIT_UNSUPPORTED,
			   "writer %d: UFFDIO_WRITEPROTECT not offered on %s memory",
			   h->id, backing_names[o->backing]);
	return uffd;
}

/* --populate yes: fault every page in without changing it (thread step 1b). */
static void writer_populate(int sock, struct hello *h, void *ram, size_t size,
			    size_t psz)
{
	uint64_t t0 = now_ns();

	h->rss_kb0 = proc_status_kb(0, "VmRSS");
	h->pte_kb0 = proc_status_kb(0, "VmPTE");
	if (madvise(ram, size, MADV_POPULATE_WRITE)) {
		if (errno != EINVAL)
			hello_fail(sock, h, EXIT_RUNTIME,
				   "writer %d: madvise(MADV_POPULATE_WRITE) failed: %s (errno %d)",
				   h->id, strerror(errno), errno);
		/* before 5.14: read every page */
		for (size_t off = 0; off < size; off += psz)
			(void)*(volatile uint8_t *)((uint8_t *)ram + off);
	}
	h->populate_ns = now_ns() - t0;
	h->populated_pages = size / psz;
	h->rss_kb1 = proc_status_kb(0, "VmRSS");
	h->pte_kb1 = proc_status_kb(0, "VmPTE");
}

/*
 * Forked with the coordinator's handlers and the signals blocked: restore
 * the default actions, so a writer that gets SIGINT/SIGTERM/SIGHUP (alone,
 * or with its whole process group from a terminal) just dies, silently, and
 * the coordinator, which reaps it, reports how.
 */
static void writer_signals(void)
{
	static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGALRM };
	sigset_t fatal;

	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		if (signal(sigs[i], SIG_DFL) == SIG_ERR)
			_exit(EXIT_RUNTIME);
	util_fatal_sigset(&fatal);
	sigaddset(&fatal, SIGALRM);
	if (sigprocmask(SIG_UNBLOCK, &fatal, NULL))
		_exit(EXIT_RUNTIME);
}

static void die_with_parent(pid_t parent)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)        /* parent died before prctl */
		_exit(EXIT_RUNTIME);
}

/* Writer 0 with --fork-child: the child inherits the mapping but, without
 * UFFD_FEATURE_EVENT_FORK, not the registration. */
static pid_t spawn_fork_child(struct wctx *w)
{
	pid_t me = getpid();
	pid_t pid = fork();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		die_with_parent(me);
		/* Without the uffd: only the coordinator may keep writer 0's. */
		if (g_own_uffd >= 0)
			close(g_own_uffd);
		close(g_own_sock);
		w->id = w->o->writers;
		w->role = ROLE_FORK_CHILD;
		w->child = 0;
		w->rng = mix64(w->o->seed ^ 0xf00dULL);
		atomic_store(&w->ctl->slot[w->id].pid, (int32_t)getpid());
		writer_loop(w);
		_exit(0);
	}
	return pid;
}

void writer_process(const struct opts *o, struct ctl *ctl, int id, int fd,
		    int sock, size_t psz, uint64_t npages, pid_t coordinator)
{
	struct hello h = { .id = id, .pid = (int32_t)getpid(), .ok = 1,
			   .rss_kb0 = -1, .pte_kb0 = -1, .rss_kb1 = -1, .pte_kb1 = -1 };
	size_t size = psz * npages;
	bool registered = id < o->writers - o->unregistered;
	struct wctx w = { .o = o, .ctl = ctl, .id = id, .psz = psz, .npages = npages,
			  .fd = fd, .pipefd = { -1, -1 } };
	int uffd = -1;

	writer_signals();
	die_with_parent(coordinator);
	util_set_child(true);
	prctl(PR_SET_TIMERSLACK, 1UL);
	atomic_store(&ctl->slot[id].pid, h.pid);

	w.ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (w.ram == MAP_FAILED)
		hello_fail(sock, &h, EXIT_RUNTIME,
			   "writer %d: mmap(MAP_SHARED, %zu bytes) failed: %s (errno %d)",
			   id, size, strerror(errno), errno);
	h.ram_base = (uintptr_t)w.ram;
	w.role = registered ? ROLE_REGISTERED : ROLE_UNREGISTERED;
	writer_seed(&w);
	if (registered && o->strategy != ST_STW)
		uffd = writer_uffd(o, sock, &h, w.ram, size);
	if (o->populate)
		writer_populate(sock, &h, w.ram, size, psz);
	if (id == 0 && o->kernel_writes == KW_READ && pipe2(w.pipefd, O_CLOEXEC))
		hello_fail(sock, &h, EXIT_RUNTIME, "writer 0: pipe2 failed: %s", strerror(errno));
	g_own_uffd = uffd;
	g_own_sock = sock;
	if (id == 0 && o->fork_child) {
		w.child = spawn_fork_child(&w);
		if (w.child < 0)
			hello_fail(sock, &h, EXIT_RUNTIME, "writer 0: fork for --fork-child failed: %s",
				   strerror((int)-w.child));
		h.child_pid = w.child;
	}
	if (hello_send(sock, &h, uffd))
		_exit(EXIT_RUNTIME);
	/* The coordinator now holds the only uffd: if it dies, the uffd is
	 * released, registrations go away and no write here blocks forever. */
	if (uffd >= 0)
		close(uffd);

	writer_loop(&w);
	if (w.child > 0) {     /* the child saw CMD_STOP too */
		int status;

		waitpid(w.child, &status, 0);
	}
	_exit(0);
}
