/* SPDX-License-Identifier: MIT */
/* setup.c - see setup.h */
#include "setup.h"
#include "coord.h"
#include "ctl.h"
#include "stamp.h"
#include "uffd.h"
#include "util.h"
#include "writer.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define RAM_NAME "uffd-lab-guest-ram"  /* memfd name, shown in /proc/PID/maps */
#define HELLO_POLL_MS 50               /* check liveness this often while waiting for hellos */

/* ---- guest RAM, snapshot buffers, control block ---- */

static void make_backing(struct coord *c)
{
	struct opts *o = c->o;
	char path[128];

	c->fd = -1;
	switch (o->backing) {
	case B_MEMFD:
		c->fd = memfd_create(RAM_NAME, MFD_CLOEXEC);
		if (c->fd < 0)
			die_sys("memfd_create", "creating guest RAM");
		break;
	case B_HUGETLBFS:
		c->fd = memfd_create(RAM_NAME, MFD_CLOEXEC | MFD_HUGETLB);
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
	case B_N:
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
	size_t words = bitmap_words(c->npages);

	/* pre-faulted so both strategies copy at the same memory speed */
	c->snap = alloc_buffer(c, "snapshot");
	if (c->o->verify == V_COPY)
		c->ref = alloc_buffer(c, "verifier reference");
	c->ctl_size = ctl_size(c->npages);
	c->ctl = mmap(NULL, c->ctl_size, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c->ctl == MAP_FAILED)
		die_sys("mmap", "allocating the shared control block");
	c->pstate = xcalloc(c->npages, 1);
	c->scan_bits = xcalloc(words, sizeof(uint64_t));
	if (!c->o->prefill)
		c->written_at_instant = xcalloc(words, sizeof(uint64_t));
	if (c->o->punch_hole)
		c->pre_punch = xcalloc(words, sizeof(uint64_t));
}

void setup_memory(struct coord *c)
{
	make_backing(c);
	make_buffers(c);
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
	struct pollfd pfd = { .fd = c->sock[i], .events = POLLIN };
	struct proc *p = &c->proc[i];
	struct hello h;
	ssize_t n;
	int uffd;

	c->doing = "waiting for writers to set up";
	while (poll(&pfd, 1, HELLO_POLL_MS) == 0)
		coord_check(c);
	n = hello_recv(c->sock[i], &h, &uffd);
	if (n < 0)
		die_sys("recvmsg", "receiving writer %d's uffd", i);
	if (n != (ssize_t)sizeof(h)) {
		/* most likely it died: its exit status follows the close shortly */
		for (int k = 0; k < 100; k++) {
			c->last_alive_check = 0;
			coord_check(c);
			sleep_ns(10000000);
		}
		die_runtime("writer %d (pid %d) closed its channel during setup", i,
			    (int)c->wpid[i]);
	}
	if (!h.ok) {
		if (h.exit_code == EXIT_UNSUPPORTED)
			die_unsupported(NULL, NULL, NULL, "%s", h.msg);
		die_runtime("%s", h.msg);
	}
	p->id = i;
	p->pid = h.pid;
	p->base = (uintptr_t)h.ram_base;
	p->uffd = uffd;
	p->pagemap_fd = -1;
	p->rss0 = h.rss_kb0;
	p->pte0 = h.pte_kb0;
	p->rss1 = h.rss_kb1;
	p->pte1 = h.pte_kb1;
	p->populate_ns = h.populate_ns;
	p->populated = h.populated_pages;
	if (h.child_pid > 0)
		c->child_pid = h.child_pid;
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
			die_sys("ioctl(UFFDIO_API)", "features 0x%llx",
				(unsigned long long)o->uffd_features);
		}
		ret = uffd_register(p->uffd, c->ram, c->size, UFFDIO_REGISTER_MODE_WP, &ioctls);
		if (ret) {
			errno = -ret;
			die_sys("ioctl(UFFDIO_REGISTER, MODE_WP)",
				"registering anonymous guest RAM");
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
		writer_seed(w);
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

void setup_writers(struct coord *c)
{
	struct opts *o = c->o;

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
}

void setup_free(struct coord *c)
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
	free((void *)c->pre_punch);
	free(c);
}
