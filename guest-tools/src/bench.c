/* SPDX-License-Identifier: MIT */
/*
 * uffd-bench - the floors other numbers are compared with, measured in the
 * same run: memcpy bandwidth, and one uffd-wp fault round trip in a single
 * process (a writer thread faults, a handler thread copies the page and
 * un-protects it, waking the writer).  One JSON object on stdout.
 */
#include "uffd.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <getopt.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct rt {
	uint8_t *ram, *copy;
	size_t psz;
	uint64_t n;
	int uffd;
	uint64_t gap_ns;
	_Atomic uint64_t op_start;
	_Atomic int done;
	struct hist handler_lat, writer_lat;
};

static double memcpy_gb_s(uint64_t size, int reps, double *best_out)
{
	uint8_t *a = mmap(NULL, size, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	uint8_t *b = mmap(NULL, size, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	double best = 0, sum = 0;

	if (a == MAP_FAILED || b == MAP_FAILED)
		die_sys("mmap", "allocating 2 x %" PRIu64 " bytes for memcpy", size);
	memset(a, 0x5a, size);
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns(), dt;

		memcpy(b, a, size);
		dt = now_ns() - t0;
		sum += (double)size / (double)dt;
		if ((double)size / (double)dt > best)
			best = (double)size / (double)dt;
	}
	munmap(a, size);
	munmap(b, size);
	*best_out = best;
	return sum / reps;     /* bytes per ns == GB/s */
}

static void *rt_handler(void *arg)
{
	struct rt *r = arg;
	struct pollfd pfd = { .fd = r->uffd, .events = POLLIN };

	while (!atomic_load(&r->done)) {
		struct uffd_msg m;
		uint64_t page, start;

		if (poll(&pfd, 1, 100) <= 0)
			continue;
		if (read(r->uffd, &m, sizeof(m)) != sizeof(m))
			continue;
		start = atomic_load(&r->op_start);
		page = (m.arg.pagefault.address - (uintptr_t)r->ram) / r->psz;
		memcpy(r->copy + page * r->psz, r->ram + page * r->psz, r->psz);
		uffd_wp_or_die(r->uffd, (uintptr_t)r->ram + page * r->psz, r->psz,
			       false, false, "the faulting page");
		hist_add(&r->handler_lat, now_ns() - start);
	}
	return NULL;
}

static void round_trips(struct rt *r)
{
	size_t size = r->n * r->psz;
	uint64_t offered = 0;
	pthread_t th;
	int fd = memfd_create("uffd-bench", MFD_CLOEXEC), ret;

	if (fd < 0 || ftruncate(fd, (off_t)size))
		die_sys("memfd_create/ftruncate", "round-trip RAM");
	r->ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	r->copy = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (r->ram == MAP_FAILED || r->copy == MAP_FAILED)
		die_sys("mmap", "round-trip buffers");
	memset(r->ram, 1, size);
	r->uffd = uffd_open(UFFD_SRC_SYSCALL);
	if (r->uffd < 0) {
		errno = -r->uffd;
		die_sys("userfaultfd", "round-trip uffd");
	}
	ret = uffd_api(r->uffd, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, &offered, NULL);
	if (ret == -EOPNOTSUPP) {
		const struct uffd_feature_info *f =
			uffd_feature_by_bit(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);

		die_unsupported(f->name, f->min_kernel, NULL, "%s needs Linux %s (running %s)",
				f->name, f->min_kernel, kernel_release());
	}
	if (ret) {
		errno = -ret;
		die_sys("ioctl(UFFDIO_API)", "round-trip uffd");
	}
	if ((ret = uffd_register(r->uffd, r->ram, size, UFFDIO_REGISTER_MODE_WP, NULL))) {
		errno = -ret;
		die_sys("ioctl(UFFDIO_REGISTER)", "round-trip RAM");
	}
	uffd_wp_or_die(r->uffd, (uintptr_t)r->ram, size, true, false, "round-trip RAM");
	hist_init(&r->handler_lat);
	hist_init(&r->writer_lat);
	if (pthread_create(&th, NULL, rt_handler, r))
		die_runtime("pthread_create failed");
	for (uint64_t i = 0; i < r->n; i++) {
		uint64_t t0;

		sleep_ns(r->gap_ns);            /* the handler is idle in poll, as in a run */
		t0 = now_ns();
		atomic_store(&r->op_start, t0);
		*(volatile uint64_t *)(r->ram + i * r->psz) = i;   /* faults */
		hist_add(&r->writer_lat, now_ns() - t0);
	}
	atomic_store(&r->done, 1);
	pthread_join(th, NULL);
	close(r->uffd);
	close(fd);
	munmap(r->ram, size);
	munmap(r->copy, size);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "memcpy-size", required_argument, NULL, 'm' },
		{ "round-trips", required_argument, NULL, 'n' },
		{ "gap-us", required_argument, NULL, 'g' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct rt r = { .psz = (size_t)sysconf(_SC_PAGESIZE), .n = 2000, .gap_ns = 50000 };
	uint64_t msize = 1ULL << 30, v;
	double avg, best;
	struct json j;
	int c;

	g_tool = "uffd-bench";
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (!parse_size(optarg, &msize) || msize < (1 << 20))
				die_usage("--memcpy-size", "--memcpy-size: got '%s', expected a size >= 1M like 1G", optarg);
			break;
		case 'n':
			if (!parse_u64(optarg, &v) || v < 10 || v > 1000000)
				die_usage("--round-trips", "--round-trips: got '%s', expected an integer from 10 to 1000000", optarg);
			r.n = v;
			break;
		case 'g':
			if (!parse_u64(optarg, &v) || v > 100000)
				die_usage("--gap-us", "--gap-us: got '%s', expected an integer from 0 to 100000", optarg);
			r.gap_ns = v * 1000;
			break;
		case 'h':
			printf("usage: uffd-bench [--memcpy-size SIZE] [--round-trips N] [--gap-us US]\n");
			return 0;
		default:
			die_usage(argv[optind - 1], "unknown option or missing value '%s'", argv[optind - 1]);
		}
	}
	avg = memcpy_gb_s(msize, 5, &best);
	round_trips(&r);

	j_init(&j);
	j_obj_open(&j, NULL);
	j_str(&j, "type", "bench");
	j_str(&j, "tool", "uffd-bench");
	j_str(&j, "kernel", kernel_release());
	j_uint(&j, "memcpy_bytes", msize);
	j_dbl(&j, "memcpy_gb_s", avg);
	j_dbl(&j, "memcpy_best_gb_s", best);
	j_uint(&j, "round_trip_gap_us", r.gap_ns / 1000);
	hist_json_summary(&j, "round_trip_us", &r.handler_lat);
	hist_json_summary(&j, "round_trip_writer_us", &r.writer_lat);
	j_obj_close(&j);
	json_emit(&j);
	j_free(&j);
	return 0;
}
