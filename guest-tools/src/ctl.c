/* SPDX-License-Identifier: MIT */
/* ctl.c - see ctl.h */
#include "ctl.h"
#include "util.h"

#include <errno.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

size_t ctl_size(uint64_t npages)
{
	return sizeof(struct ctl) + bitmap_words(npages) * sizeof(uint64_t);
}

/* Shared (not PRIVATE) futexes: coordinator and writers are separate processes. */
static void futex_wake_all(_Atomic uint32_t *addr)
{
	syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

void ctl_wait(struct ctl *ctl, uint32_t gen, uint64_t timeout_ns)
{
	struct timespec ts = ns_to_timespec(timeout_ns);

	syscall(SYS_futex, (uint32_t *)&ctl->cmd_gen, FUTEX_WAIT, gen, &ts, NULL, 0);
}

void ctl_command(struct ctl *ctl, enum cmd cmd)
{
	atomic_store(&ctl->cmd, cmd);
	atomic_fetch_add(&ctl->cmd_gen, 1);
	futex_wake_all(&ctl->cmd_gen);
}

uint32_t ctl_pause(struct ctl *ctl)
{
	uint32_t seq = atomic_load(&ctl->pause_seq) + 1;

	atomic_store(&ctl->ref_ns, 0);
	atomic_store(&ctl->pause_seq, seq);
	ctl_command(ctl, CMD_PAUSE);
	return seq;
}

bool ctl_all_paused(struct ctl *ctl, int npart, uint32_t seq)
{
	for (int i = 0; i < npart; i++)
		if (atomic_load_explicit(&ctl->slot[i].pause_ack, memory_order_acquire) != seq)
			return false;
	return true;
}

int hello_send(int sock, const struct hello *h, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { .iov_base = (void *)h, .iov_len = sizeof(*h) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (fd >= 0) {
		struct cmsghdr *cm;

		memset(cbuf, 0, sizeof(cbuf));
		msg.msg_control = cbuf;
		msg.msg_controllen = sizeof(cbuf);
		cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof(*h) ? 0 : -errno;
}

ssize_t hello_recv(int sock, struct hello *h, int *fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { .iov_base = h, .iov_len = sizeof(*h) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	ssize_t n;

	*fd = -1;
	n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	if (n < 0)
		return n;
	cm = CMSG_FIRSTHDR(&msg);
	if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
		memcpy(fd, CMSG_DATA(cm), sizeof(int));
	return n;
}
