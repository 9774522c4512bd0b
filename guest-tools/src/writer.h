/* SPDX-License-Identifier: MIT */
/*
 * writer.h - the writer role (vhost-user-backend's): stamp pages at a rate
 * and pattern, obey the coordinator's commands, and in process mode set up
 * its own mapping and uffd and pass the uffd on.
 */
#ifndef UFFDLAB_WRITER_H
#define UFFDLAB_WRITER_H

#include "ctl.h"
#include "options.h"
#include "stamp.h"

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Everything a writer (process or thread) needs. */
struct wctx {
	const struct opts *o;
	struct ctl *ctl;
	int id;                  /* participant id: 0..writers-1, writers = fork child */
	enum role role;
	uint8_t *ram;
	size_t psz;
	uint64_t npages;
	int fd;                  /* backing fd (-1 for anon) */
	uint64_t rng;
	uint64_t cursor;         /* sequential pattern */
	pid_t child;             /* writer 0's fork child */
	int pipefd[2];           /* --kernel-writes read */
};

/* Seed w's page choice (random state, sequential start) from --seed, its
 * id and the RAM size: the same in thread and process mode. */
void writer_seed(struct wctx *w);

/* Write until CMD_STOP, then leave the statistics in the slot. */
void writer_loop(struct wctx *w);

/* A forked writer process: map RAM, register, say hello, write; never returns. */
__attribute__((noreturn))
void writer_process(const struct opts *o, struct ctl *ctl, int id, int fd,
		    int sock, size_t psz, uint64_t npages, pid_t coordinator);

#endif
