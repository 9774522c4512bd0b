/*
 * stamp.h - page stamps and the snapshot verifier.
 *
 * Every write a writer makes is a 64-byte stamp at the start of a page:
 * who wrote it, how (store, pwrite, kernel write), in which epoch (0 before
 * the snapshot instant, 1 after) and the writer's sequence number, protected
 * by a check word.  The rest of the page is a fixed pattern derived from the
 * page index (or zero when the RAM was not prefilled).  A page's content is
 * therefore a pure function of its last stamp, which lets the verifier decide
 * exactly, page by page, whether the snapshot holds the content the page had
 * at the instant (see README.md, "How the verifier decides").
 */
#ifndef UFFDLAB_STAMP_H
#define UFFDLAB_STAMP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STAMP_MAGIC 0x44464655u     /* "UFFD" */
#define STAMP_BYTES 64
#define PREFILL_WRITER 0xffffu

enum stamp_how {
	HOW_PREFILL = 0,   /* written by the coordinator before writers start */
	HOW_STORE = 1,     /* CPU store through the mapping */
	HOW_PWRITE = 2,    /* pwrite(2) on the backing fd */
	HOW_KREAD = 3,     /* read(2) from a pipe into the mapping (kernel write) */
	HOW_KPVW = 4,      /* process_vm_writev(2) into the mapping (kernel write) */
};

struct stamp {
	uint32_t magic;
	uint16_t writer;   /* participant id, PREFILL_WRITER for the prefill */
	uint16_t how;      /* enum stamp_how */
	uint32_t epoch;
	uint32_t reserved;
	uint64_t page;     /* page index the stamp belongs to */
	uint64_t seq;      /* writer's sequence number */
	uint64_t check;    /* hash of the fields above */
	uint64_t tail[3];  /* derived from check: a torn copy breaks them */
};
_Static_assert(sizeof(struct stamp) == STAMP_BYTES, "stamp is one cache line");

void stamp_make(struct stamp *s, uint16_t writer, uint16_t how, uint32_t epoch,
		uint64_t page, uint64_t seq);
bool stamp_valid(const struct stamp *s, uint64_t page);
/* Fill a whole page as the coordinator's prefill does. */
void page_prefill(void *page, size_t psz, uint64_t idx);
/* Is everything after the stamp what it should be? */
bool page_body_ok(const void *page, size_t psz, uint64_t idx, bool prefilled);
bool page_is_zero(const void *page, size_t psz);

/* ---- verifier ---- */

enum cause {
	CAUSE_WP_MISSED,      /* a registered, armed writer's write leaked: kernel or tool bug */
	CAUSE_STAGGERED,      /* written by a registered writer before it was armed */
	CAUSE_UNREGISTERED,   /* written by a writer that never registered */
	CAUSE_FORK_CHILD,     /* written by a fork child (no EVENT_FORK) */
	CAUSE_FD_WRITE,       /* pwrite on the fd: never seen by uffd-wp */
	CAUSE_KERNEL_WRITE,   /* read(2)/process_vm_writev into the mapping */
	CAUSE_PUNCH_HOLE,     /* fallocate(PUNCH_HOLE) zeroed it */
	CAUSE_ZEROED,         /* zero page where content was expected (zap on anon, ...) */
	CAUSE_INVALID,        /* torn or corrupted content */
	CAUSE_STALE,          /* older than the instant (iterative copy missed a write) */
	CAUSE_N
};
extern const char *const cause_names[CAUSE_N];

enum role { ROLE_REGISTERED, ROLE_UNREGISTERED, ROLE_FORK_CHILD };

struct verify_in {
	const uint8_t *snap;        /* the snapshot */
	const uint8_t *ref;         /* copy mode: RAM copied at the instant; NULL = stamp mode */
	size_t psz;
	uint64_t npages;
	bool prefilled;
	const uint64_t *written;    /* !prefilled: bitmap of pages written before the instant */
	uint32_t arm_epoch;         /* stamps with epoch >= arm_epoch came after the instant */
	const uint8_t *roles;       /* enum role by writer id */
	unsigned nroles;
	bool staggered;             /* registered writers were armed one by one */
	uint64_t punch_first, punch_pages;
};

struct verify_out {
	uint64_t mismatched;
	uint64_t by_cause[CAUSE_N];
	uint64_t first_bad[8];      /* a few mismatched page indexes, for debugging */
	unsigned nfirst;
};

void verify_snapshot(const struct verify_in *in, struct verify_out *out);
/* Damage n pages of a snapshot on purpose (--corrupt-snapshot). */
void corrupt_snapshot(uint8_t *snap, size_t psz, uint64_t npages, uint64_t n);

#endif
