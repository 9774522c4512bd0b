/*
 * coord.c - coordinator setup, writers, fault handler thread and reports.
 */
#include "coord.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static struct coord *g_coord;     /* for the cleanup hook and signal handler */

/* ---- cleanup: no writer outlives the coordinator ---- */

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
	m = append(line, m, sizeof(line), "{\"type\":\"error\",\"tool\":\"uffd-snapshot\","
		   "\"exit_code\":3,\"kind\":\"runtime\",\"message\":\"");
	m = append(line, m, sizeof(line), msg);
	m = append(line, m, sizeof(line), "\"}\n");
	r = write(STDOUT_FILENO, line, m);
	m = append(line, 0, sizeof(line), "uffd-snapshot: ");
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

/* ---- kernel features ---- */

static void need_feature(struct coord *c, uint64_t bit, const char *why)
{
	const struct uffd_feature_info *f = uffd_feature_by_bit(bit);

	if (c->offered & bit)
		return;
	die_unsupported(f->name, f->min_kernel, why,
			"%s needs Linux %s (running %s): %s", f->name, f->min_kernel,
			kernel_release(), why);
}

static void query_kernel(struct coord *c)
{
	struct opts *o = c->o;
	int ret = uffd_query_features(o->uffd_source, &c->offered, NULL);

	if (ret == -ENOENT && o->uffd_source == UFFD_SRC_DEV)
		die_unsupported("/dev/userfaultfd", "6.1", NULL,
				"/dev/userfaultfd needs Linux 6.1 (running %s); try --uffd-source syscall",
				kernel_release());
	if (ret == -EINVAL && o->uffd_source == UFFD_SRC_SYSCALL_USER_ONLY)
		die_unsupported("UFFD_USER_MODE_ONLY", "5.11", NULL,
				"UFFD_USER_MODE_ONLY needs Linux 5.11 (running %s)", kernel_release());
	if (ret == -ENOSYS)
		die_unsupported("userfaultfd", "4.3", NULL,
				"userfaultfd(2) is not available (CONFIG_USERFAULTFD off?) on %s",
				kernel_release());
	if (ret == -EPERM || ret == -EACCES) {
		errno = -ret;
		die_sys(o->uffd_source == UFFD_SRC_DEV ? "open(/dev/userfaultfd)" : "userfaultfd(2)",
			"cannot create a userfaultfd (as non-root set vm.unprivileged_userfaultfd=1, "
			"or use --uffd-source syscall-user-only or devuserfaultfd)");
	}
	if (ret) {
		errno = -ret;
		die_sys("ioctl(UFFDIO_API)", "querying userfaultfd features");
	}
}

/* Decide the features every writer uffd asks for; exit 2 if one is missing. */
static void decide_features(struct coord *c)
{
	struct opts *o = c->o;
	uint64_t f = 0;

	o->uffd_features = 0;
	if (o->strategy == ST_STW) {
		/* no uffd needed; report what is offered if we can */
		if (uffd_query_features(o->uffd_source, &c->offered, NULL))
			c->offered = 0;
		return;
	}
	query_kernel(c);
	if (o->backing == B_ANON) {
		need_feature(c, UFFD_FEATURE_PAGEFAULT_FLAG_WP, "uffd-wp on anonymous memory");
		need_feature(c, UFFD_FEATURE_THREAD_ID, "mapping faults to writer threads");
		f |= UFFD_FEATURE_THREAD_ID;
		if (!o->prefill && !o->populate) {
			need_feature(c, UFFD_FEATURE_WP_UNPOPULATED,
				     "protecting never-touched anonymous pages (--prefill no --populate no)");
		}
		if (c->offered & UFFD_FEATURE_WP_UNPOPULATED)
			f |= UFFD_FEATURE_WP_UNPOPULATED;
	} else {
		need_feature(c, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
			     "uffd-wp on shmem/memfd/hugetlbfs (PTE markers)");
		f |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
	}
	if (o->strategy == ST_ASYNC) {
		need_feature(c, UFFD_FEATURE_WP_ASYNC, "--strategy async-scan");
		f |= UFFD_FEATURE_WP_ASYNC;
		if (!pagemap_scan_supported())
			die_unsupported("PAGEMAP_SCAN", "6.7", "--strategy async-scan",
					"PAGEMAP_SCAN needs Linux 6.7 (running %s): --strategy async-scan uses it",
					kernel_release());
	}
	o->uffd_features = f;
}

/* ---- guest RAM, snapshot buffers, control block ---- */

static void make_backing(struct coord *c)
{
	struct opts *o = c->o;
	char path[128];

	c->fd = -1;
	switch (o->backing) {
	case B_MEMFD:
		c->fd = memfd_create("uffd-lab-guest-ram", MFD_CLOEXEC);
		if (c->fd < 0)
			die_sys("memfd_create", "creating guest RAM");
		break;
	case B_HUGETLBFS:
		c->fd = memfd_create("uffd-lab-guest-ram", MFD_CLOEXEC | MFD_HUGETLB);
		if (c->fd < 0)
			die_sys("memfd_create(MFD_HUGETLB)", "creating hugetlbfs guest RAM");
		break;
	case B_SHMEM:
		snprintf(path, sizeof(path), "/dev/shm/uffd-lab-%d", (int)getpid());
		c->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (c->fd < 0)
			die_sys("open", "creating %s", path);
		unlink(path);    /* nothing left behind, whatever happens */
		break;
	case B_ANON:
		break;
	}
	if (c->fd >= 0 && ftruncate(c->fd, (off_t)c->size))
		die_sys("ftruncate", "sizing guest RAM to %zu bytes", c->size);
	if (c->fd >= 0)
		c->ram = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
	else
		c->ram = mmap(NULL, c->size, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (c->ram == MAP_FAILED) {
		if (o->backing == B_HUGETLBFS && errno == ENOMEM)
			die_runtime("not enough free huge pages for --size %zu (HugePages_Free=%ld)",
				    c->size, meminfo_value("HugePages_Free"));
		die_sys("mmap", "mapping %zu bytes of guest RAM", c->size);
	}
	/* writers map the fd themselves; they must not inherit ours */
	if (c->fd >= 0)
		madvise(c->ram, c->size, MADV_DONTFORK);
	if (o->prefill)
		for (uint64_t p = 0; p < c->npages; p++)
			page_prefill(c->ram + p * c->psz, c->psz, p);
}

static uint8_t *alloc_buffer(struct coord *c, const char *what)
{
	uint8_t *p = mmap(NULL, c->size, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED)
		die_sys("mmap", "allocating the %s buffer (%zu bytes)", what, c->size);
	madvise(p, c->size, MADV_DONTFORK);
	return p;
}

static void make_buffers(struct coord *c)
{
	size_t words = (c->npages + 63) / 64;

	/* pre-faulted so both strategies copy at the same memory speed */
	c->snap = alloc_buffer(c, "snapshot");
	if (c->o->verify == V_COPY)
		c->ref = alloc_buffer(c, "verifier reference");
	c->ctl_size = sizeof(struct ctl) + words * sizeof(uint64_t);
	c->ctl = mmap(NULL, c->ctl_size, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c->ctl == MAP_FAILED)
		die_sys("mmap", "allocating the shared control block");
	c->pstate = xcalloc(c->npages, 1);
	c->scan_bits = xcalloc(words, sizeof(uint64_t));
	if (!c->o->prefill)
		c->written_at_instant = xcalloc(words, sizeof(uint64_t));
}

/* ---- writers ---- */

static void spawn_processes(struct coord *c)
{
	struct opts *o = c->o;
	pid_t me = getpid();
	sigset_t fatal, old;

	fflush(stdout);
	/* a writer must not run the coordinator's handlers: it resets them
	 * (writer_process) before these signals reach it */
	util_fatal_sigset(&fatal);
	sigaddset(&fatal, SIGALRM);
	if (sigprocmask(SIG_BLOCK, &fatal, &old))
		die_sys("sigprocmask", "blocking signals to start writers");
	for (int i = 0; i < o->writers; i++) {
		int sv[2];
		pid_t pid;

		if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv))
			die_sys("socketpair", "creating the channel to writer %d", i);
		pid = fork();
		if (pid < 0)
			die_sys("fork", "starting writer %d", i);
		if (pid == 0) {
			for (int k = 0; k < i; k++)
				close(c->sock[k]);
			close(sv[0]);
			writer_process(o, c->ctl, i, c->fd, sv[1], c->psz, c->npages, me);
		}
		close(sv[1]);
		c->sock[i] = sv[0];
		c->wpid[i] = pid;
	}
	if (sigprocmask(SIG_SETMASK, &old, NULL))
		die_sys("sigprocmask", "unblocking signals after starting writers");
}

/* Receive one writer's hello and, with it, its uffd (SCM_RIGHTS). */
static void receive_hello(struct coord *c, int i)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct hello h;
	struct iovec iov = { .iov_base = &h, .iov_len = sizeof(h) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct pollfd pfd = { .fd = c->sock[i], .events = POLLIN };
	struct proc *p = &c->proc[i];
	struct cmsghdr *cm;
	ssize_t n;

	c->doing = "waiting for writers to set up";
	while (poll(&pfd, 1, 50) == 0)
		coord_check(c);
	n = recvmsg(c->sock[i], &msg, MSG_CMSG_CLOEXEC);
	if (n < 0)
		die_sys("recvmsg", "receiving writer %d's uffd", i);
	if (n != (ssize_t)sizeof(h)) {
		/* most likely it died: its exit status follows the close shortly */
		for (int k = 0; k < 100; k++) {
			c->last_alive_check = 0;
			coord_check(c);
			sleep_ns(10000000);
		}
		die_runtime("writer %d (pid %d) closed its channel during setup", i, (int)c->wpid[i]);
	}
	if (!h.ok) {
		if (h.exit_code == EXIT_UNSUPPORTED)
			die_unsupported(NULL, NULL, NULL, "%s", h.msg);
		die_runtime("%s", h.msg);
	}
	p->id = i;
	p->pid = h.pid;
	p->base = (uintptr_t)h.ram_base;
	p->uffd = -1;
	p->pagemap_fd = -1;
	p->rss0 = h.rss_kb0;
	p->pte0 = h.pte_kb0;
	p->rss1 = h.rss_kb1;
	p->pte1 = h.pte_kb1;
	p->populate_ns = h.populate_ns;
	p->populated = h.populated_pages;
	if (h.child_pid > 0)
		c->child_pid = h.child_pid;
	cm = CMSG_FIRSTHDR(&msg);
	if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
		memcpy(&p->uffd, CMSG_DATA(cm), sizeof(int));
	pthread_mutex_init(&p->lock, NULL);
}

static void start_processes(struct coord *c)
{
	spawn_processes(c);
	c->nproc = c->o->writers;
	for (int i = 0; i < c->o->writers; i++)
		receive_hello(c, i);
	if (c->o->strategy == ST_ASYNC) {
		for (int i = 0; i < c->nproc; i++) {
			char path[64];

			if (c->proc[i].uffd < 0)
				continue;
			snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)c->proc[i].pid);
			c->proc[i].pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
			if (c->proc[i].pagemap_fd < 0)
				die_sys("open", "opening %s for PAGEMAP_SCAN", path);
		}
	}
}

static void *writer_thread(void *arg)
{
	writer_loop(arg);
	return NULL;
}

/* --backing anon: private memory can't be shared, so writers are threads of
 * the coordinator and there is one uffd, on the coordinator's own mm. */
static void start_threads(struct coord *c)
{
	struct opts *o = c->o;
	struct proc *p = &c->proc[0];
	uint64_t ioctls = 0;
	int ret;

	c->nproc = 1;
	memset(p, 0, sizeof(*p));
	p->pid = getpid();
	p->base = (uintptr_t)c->ram;
	p->uffd = -1;
	p->pagemap_fd = -1;
	pthread_mutex_init(&p->lock, NULL);
	if (o->strategy != ST_STW) {
		p->uffd = uffd_open(o->uffd_source);
		if (p->uffd < 0) {
			errno = -p->uffd;
			die_sys("userfaultfd", "creating the coordinator's uffd");
		}
		ret = uffd_api(p->uffd, o->uffd_features, NULL, NULL);
		if (ret) {
			errno = -ret;
			die_sys("ioctl(UFFDIO_API)", "features 0x%llx", (unsigned long long)o->uffd_features);
		}
		ret = uffd_register(p->uffd, c->ram, c->size, UFFDIO_REGISTER_MODE_WP, &ioctls);
		if (ret) {
			errno = -ret;
			die_sys("ioctl(UFFDIO_REGISTER, MODE_WP)", "registering anonymous guest RAM");
		}
		if (o->strategy == ST_ASYNC) {
			p->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
			if (p->pagemap_fd < 0)
				die_sys("open", "opening /proc/self/pagemap");
		}
	}
	p->rss0 = p->rss1 = proc_status_kb(0, "VmRSS");
	p->pte0 = p->pte1 = proc_status_kb(0, "VmPTE");
	if (o->populate) {
		uint64_t t0 = now_ns();

		if (madvise(c->ram, c->size, MADV_POPULATE_WRITE))
			die_sys("madvise(MADV_POPULATE_WRITE)", "populating guest RAM");
		p->populate_ns = now_ns() - t0;
		p->populated = c->npages;
		p->rss1 = proc_status_kb(0, "VmRSS");
		p->pte1 = proc_status_kb(0, "VmPTE");
	}
	for (int i = 0; i < o->writers; i++) {
		struct wctx *w = &c->wctx[i];

		*w = (struct wctx){ .o = o, .ctl = c->ctl, .id = i, .role = ROLE_REGISTERED,
				    .ram = c->ram, .psz = c->psz, .npages = c->npages,
				    .fd = -1, .pipefd = { -1, -1 } };
		w->rng = mix64(o->seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i + 1);
		w->cursor = c->npages * (uint64_t)i / (uint64_t)o->writers;
		if (i == 0 && o->kernel_writes == KW_READ && pipe2(w->pipefd, O_CLOEXEC))
			die_sys("pipe2", "--kernel-writes read");
		atomic_store(&c->ctl->slot[i].pid, (int32_t)getpid());
		ret = thread_create_nosig(&c->wthread[i], writer_thread, w);
		if (ret) {
			errno = ret;
			die_sys("pthread_create", "starting writer thread %d", i);
		}
	}
	/* wait until every thread is in its loop (tid published) */
	for (int i = 0; i < o->writers; i++)
		while (atomic_load(&c->ctl->slot[i].state) == SLOT_EMPTY)
			sched_yield();
}

/* ---- liveness, timeout, progress ---- */

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
	if (t - c->last_alive_check > 2000000ULL) {
		c->last_alive_check = t;
		check_writers(c);
	}
}

uint64_t coord_total_ops(struct coord *c)
{
	uint64_t sum = 0;

	for (int i = 0; i < c->npart; i++)
		sum += atomic_load_explicit(&c->ctl->slot[i].ops, memory_order_relaxed);
	return sum;
}

static uint64_t total_faults(struct coord *c)
{
	uint64_t sum = 0;

	for (int i = 0; i < c->nproc; i++)
		sum += atomic_load(&c->proc[i].faults);
	return sum;
}

void coord_progress(struct coord *c, const char *phase, bool force)
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
	j_uint(&j, "faults", total_faults(c));
	j_uint(&j, "writer_ops", coord_total_ops(c));
	j_dbl(&j, "elapsed_ms", ns_to_ms(t - c->t_start));
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
}

void coord_wait_until(struct coord *c, uint64_t t, const char *phase)
{
	c->doing = phase;
	while (now_ns() < t) {
		coord_check(c);
		coord_progress(c, phase, false);
		sleep_ns(1000000);
	}
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

/* ---- quiesce ---- */

static bool all_paused(struct coord *c, uint32_t seq)
{
	for (int i = 0; i < c->npart; i++)
		if (atomic_load_explicit(&c->ctl->slot[i].pause_ack, memory_order_acquire) != seq)
			return false;
	return true;
}

void pause_all(struct coord *c)
{
	struct ctl *ctl = c->ctl;
	uint32_t seq = atomic_load(&ctl->pause_seq) + 1;
	unsigned spins = 0;

	atomic_store(&ctl->ref_ns, 0);
	atomic_store(&ctl->pause_seq, seq);
	atomic_store(&ctl->cmd, CMD_PAUSE);
	atomic_fetch_add(&ctl->cmd_gen, 1);
	futex_wake_all(&ctl->cmd_gen);
	c->doing = "pausing writers";
	while (!all_paused(c, seq)) {
		/* writers blocked in a fault finish once the handler serves it */
		if (++spins % 64 == 0)
			coord_check(c);
		sched_yield();
	}
}

void resume_all(struct coord *c)
{
	atomic_store(&c->ctl->cmd, CMD_RUN);
	atomic_fetch_add(&c->ctl->cmd_gen, 1);
	futex_wake_all(&c->ctl->cmd_gen);
}

static void stop_all(struct coord *c)
{
	struct ctl *ctl = c->ctl;

	atomic_store(&ctl->cmd, CMD_STOP);
	atomic_fetch_add(&ctl->cmd_gen, 1);
	futex_wake_all(&ctl->cmd_gen);
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

/* ---- the fault handler thread ---- */

static void handler_error(struct coord *c, const char *fmt, ...)
{
	va_list ap;

	if (atomic_load(&c->herr))
		return;
	va_start(ap, fmt);
	vsnprintf(c->herr_msg, sizeof(c->herr_msg), fmt, ap);
	va_end(ap);
	atomic_store(&c->herr, 1);
}

static void wp_checked(struct coord *c, struct proc *p, uint64_t page, bool protect,
		       bool dontwake)
{
	int ret = uffd_wp(p->uffd, p->base + page * c->psz, c->psz, protect, dontwake);

	if (ret)
		handler_error(c, "ioctl(UFFDIO_WRITEPROTECT, %s) on writer %d page %llu failed: %s (errno %d)",
			      protect ? "WP" : "clear", p->id, (unsigned long long)page,
			      strerror(-ret), -ret);
}

/* Pre-arm fault: the instant has not come yet, so no copy: un-protect here
 * only and remember the page so the quiesced re-protect covers it.  The
 * page is recorded before the waiter is woken, so a writer that then
 * acknowledges a pause can't leave an unrecorded page behind. */
static void serve_prearm(struct coord *c, struct proc *p, uint64_t page)
{
	wp_checked(c, p, page, false, true);
	pthread_mutex_lock(&p->lock);
	if (p->ndirty == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : 1024;
		uint32_t *nd = realloc(p->dirty, cap * sizeof(*nd));

		if (!nd) {
			pthread_mutex_unlock(&p->lock);
			handler_error(c, "out of memory recording pre-arm faults");
			return;
		}
		p->dirty = nd;
		p->cap = cap;
	}
	p->dirty[p->ndirty++] = (uint32_t)page;
	pthread_mutex_unlock(&p->lock);
	if (uffd_wake(p->uffd, p->base + page * c->psz, c->psz))
		handler_error(c, "ioctl(UFFDIO_WAKE) on writer %d failed: %s", p->id, strerror(errno));
	atomic_fetch_add(&p->prearm_faults, 1);
}

static int participant_of(struct coord *c, struct proc *p, const struct uffd_msg *m)
{
	if (c->o->backing != B_ANON)
		return p->id;
	for (int i = 0; i < c->npart; i++)
		if ((uint32_t)atomic_load(&c->ctl->slot[i].tid) == m->arg.pagefault.feat.ptid)
			return i;
	return -1;
}

/* Snapshot fault: copy the old page first, then un-protect it in every
 * process (which wakes whoever waits on it there). */
static void serve_fault(struct coord *c, struct proc *p, const struct uffd_msg *m)
{
	uint64_t addr = m->arg.pagefault.address & ~((uint64_t)c->psz - 1);
	uint64_t page = (addr - p->base) / c->psz;
	int phase = atomic_load(&c->phase);
	int part = participant_of(c, p, m);
	uint64_t start = 0, t;

	if (addr < p->base || page >= c->npages) {
		handler_error(c, "fault at 0x%llx outside guest RAM of writer %d",
			      (unsigned long long)m->arg.pagefault.address, p->id);
		return;
	}
	if (phase == PH_PREARM) {
		serve_prearm(c, p, page);
		return;
	}
	if (part >= 0)
		start = atomic_load_explicit(&c->ctl->slot[part].op_start_ns, memory_order_acquire);
	copy_page_claimed(c, page);
	/* Wake the faulting writer first: its wait ends here. */
	wp_checked(c, p, page, false, false);
	t = now_ns();
	if (c->o->unprotect_all)    /* then the others, so they never fault on it */
		for (int i = 0; i < c->nproc; i++)
			if (&c->proc[i] != p && c->proc[i].uffd >= 0)
				wp_checked(c, &c->proc[i], page, false, false);
	if (phase == PH_ARMED) {
		atomic_fetch_add(&p->faults, 1);
		if (start && t > start) {
			pthread_mutex_lock(&c->lat_lock);
			hist_add(&c->lat, t - start);
			pthread_mutex_unlock(&c->lat_lock);
		}
	} else {
		atomic_fetch_add(&p->late_faults, 1);
	}
}

static void drain_uffd(struct coord *c, struct proc *p)
{
	struct uffd_msg msgs[16];

	for (;;) {
		ssize_t n = read(p->uffd, msgs, sizeof(msgs));

		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				handler_error(c, "read(uffd) of writer %d failed: %s", p->id, strerror(errno));
			return;
		}
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT ||
			    !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
				handler_error(c, "unexpected uffd event %u (flags 0x%llx) from writer %d",
					      msgs[i].event,
					      (unsigned long long)msgs[i].arg.pagefault.flags, p->id);
				continue;
			}
			serve_fault(c, p, &msgs[i]);
		}
	}
}

static void *handler_main(void *arg)
{
	struct coord *c = arg;
	struct pollfd pfd[MAX_WRITERS + 1];
	struct proc *who[MAX_WRITERS];
	int n = 0;

	for (int i = 0; i < c->nproc; i++) {
		if (c->proc[i].uffd < 0)
			continue;
		pfd[n].fd = c->proc[i].uffd;
		pfd[n].events = POLLIN;
		who[n++] = &c->proc[i];
	}
	pfd[n].fd = c->stop_efd;
	pfd[n].events = POLLIN;
	for (;;) {
		int r = poll(pfd, (nfds_t)n + 1, 100);

		if (r < 0 && errno != EINTR) {
			handler_error(c, "poll on uffds failed: %s", strerror(errno));
			return NULL;
		}
		if (pfd[n].revents & POLLIN)
			return NULL;
		for (int i = 0; i < n; i++)
			if (pfd[i].revents & POLLIN)
				drain_uffd(c, who[i]);
	}
}

static void start_handler(struct coord *c)
{
	int ret;

	if (c->o->strategy == ST_STW || c->o->strategy == ST_ASYNC)
		return;    /* no faults to serve: nothing, or WP_ASYNC in the kernel */
	c->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (c->stop_efd < 0)
		die_sys("eventfd", "creating the handler stop signal");
	ret = thread_create_nosig(&c->handler, handler_main, c);
	if (ret) {
		errno = ret;
		die_sys("pthread_create", "starting the fault handler thread");
	}
	c->handler_running = true;
}

static void stop_handler(struct coord *c)
{
	uint64_t one = 1;

	if (!c->handler_running)
		return;
	if (write(c->stop_efd, &one, sizeof(one)) != sizeof(one))
		die_sys("write(eventfd)", "stopping the fault handler");
	pthread_join(c->handler, NULL);
	c->handler_running = false;
	close(c->stop_efd);
}

/* ---- reports ---- */

static void json_feature_list(struct json *j, const char *key, uint64_t mask)
{
	j_arr_open(j, key);
	for (size_t i = 0; i < uffd_nfeatures; i++)
		if (mask & uffd_features[i].bit)
			j_str(j, NULL, uffd_features[i].name);
	j_arr_close(j);
}

static void emit_config(struct coord *c)
{
	struct opts *o = c->o;
	struct json j;

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "config");
	j_str(&j, "tool", "uffd-snapshot");
	j_int(&j, "version", 1);
	j_str(&j, "kernel", kernel_release());
	j_str(&j, "strategy", strategy_name(o->strategy));
	j_str(&j, "backing", backing_name(o->backing));
	j_uint(&j, "size_bytes", c->size);
	j_uint(&j, "page_size", c->psz);
	j_uint(&j, "pages", c->npages);
	j_int(&j, "writers", o->writers);
	j_str(&j, "pattern", pattern_name(o->pattern));
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
	j_str(&j, "unprotect", o->unprotect_all ? "all" : "faulting");
	j_str(&j, "release", o->release_chunks ? "chunk" : "end");
	j_int(&j, "unregistered", o->unregistered);
	j_bool(&j, "fd_writes", o->fd_writes);
	j_bool(&j, "punch_hole", o->punch_hole);
	j_bool(&j, "fork_child", o->fork_child);
	j_str(&j, "kernel_writes", kwrite_name(o->kernel_writes));
	j_bool(&j, "zap_after_arm", o->zap_after_arm);
	j_str(&j, "uffd_source", uffd_source_name(o->uffd_source));
	j_str(&j, "verify", vmode_name(o->verify));
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
		j_str(j, "mode", kwrite_name(o->kernel_writes));
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

static void emit_summary(struct coord *c, const struct verify_out *v)
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
	j_str(&j, "tool", "uffd-snapshot");
	j_str(&j, "strategy", strategy_name(o->strategy));
	j_str(&j, "backing", backing_name(o->backing));
	j_str(&j, "kernel", kernel_release());
	j_str(&j, "uffd_source", uffd_source_name(o->uffd_source));
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
		j_str(&j, "guarantee", "image of RAM at the final pause; writes through the fd are not tracked");
		j_obj_close(&j);
	}
	emit_injections(&j, c);

	j_str(&j, "verify", vmode_name(o->verify));
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

/* ---- verification ---- */

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
	coord_progress(c, "verify", true);
	t0 = now_ns();
	verify_snapshot(&in, v);
	c->verify_ns = now_ns() - t0;
}

/* ---- the run ---- */

static void coord_free(struct coord *c)
{
	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];

		if (p->uffd >= 0)
			close(p->uffd);
		if (p->pagemap_fd >= 0)
			close(p->pagemap_fd);
		free(p->dirty);
		pthread_mutex_destroy(&p->lock);
	}
	for (int i = 0; c->o->backing != B_ANON && i < c->o->writers; i++)
		close(c->sock[i]);
	if (c->o->backing == B_ANON && c->wctx[0].pipefd[0] >= 0) {
		close(c->wctx[0].pipefd[0]);
		close(c->wctx[0].pipefd[1]);
	}
	munmap(c->ram, c->size);
	munmap(c->snap, c->size);
	if (c->ref)
		munmap(c->ref, c->size);
	munmap(c->ctl, c->ctl_size);
	if (c->fd >= 0)
		close(c->fd);
	free((void *)c->pstate);
	free(c->scan_bits);
	free(c->written_at_instant);
	free(c);
}

int coord_run(struct opts *o)
{
	struct coord *c = xcalloc(1, sizeof(*c));
	struct verify_out v;

	g_coord = c;
	c->o = o;
	c->t_start = now_ns();
	c->deadline = c->t_start + (uint64_t)(o->timeout * 1e9);
	c->doing = "setting up";
	c->psz = o->backing == B_HUGETLBFS ? (size_t)meminfo_value("Hugepagesize") * 1024
					    : (size_t)sysconf(_SC_PAGESIZE);
	c->size = o->size;
	c->npages = c->size / c->psz;
	c->npart = o->writers + (o->fork_child ? 1 : 0);
	pthread_mutex_init(&c->lat_lock, NULL);
	hist_init(&c->lat);
	install_signals(o);
	util_set_cleanup(coord_cleanup);

	decide_features(c);
	make_backing(c);
	make_buffers(c);
	if (o->backing == B_ANON)
		start_threads(c);
	else
		start_processes(c);
	/* the fork child's slot is filled by the child itself */
	while (o->fork_child && atomic_load(&c->ctl->slot[o->writers].state) == SLOT_EMPTY) {
		c->doing = "waiting for the fork child";
		coord_check(c);
		sched_yield();
	}
	emit_config(c);
	start_handler(c);

	/* writers run; warm up, snapshot, keep running until --duration */
	c->t_go = now_ns();
	c->ops_go = coord_total_ops(c);
	resume_all(c);
	coord_wait_until(c, c->t_go + (uint64_t)(o->warmup * 1e9), "warmup");
	run_strategy(c);
	coord_progress(c, "copied", true);
	coord_wait_until(c, c->t_go + (uint64_t)(o->duration * 1e9), "running");
	stop_all(c);
	stop_handler(c);
	c->t_end = now_ns();

	verify(c, &v);
	emit_summary(c, &v);
	util_set_cleanup(NULL);
	g_coord = NULL;
	coord_free(c);
	return EXIT_RAN;
}
