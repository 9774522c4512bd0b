/* SPDX-License-Identifier: MIT */
/*
 * stamp.h - page stamps and the snapshot verifier.
 *
 * A page write is one aligned 8-byte store of a stamp word into the
 * writer's own slot of the page: word `id` for participant `id`.  Writers
 * never write the same bytes, so concurrent writers can't tear each other's
 * stamps, and every stamp is a single atomic store.  A stamp word says how
 * it was written (store, pwrite, kernel write), in which epoch (0 before the
 * snapshot instant, 1 after) and the writer's sequence number, protected by
 * a check that also covers the page and slot, so a word copied to the wrong
 * place is caught.  Every other word of a page is a fixed pattern derived
 * from the page index (or zero when RAM was not prefilled).
 *
 * So each word's history is: its prefill value, then stamps; and every
 * change after the instant is an epoch-1 stamp or zeroing the page.  That
 * is what lets the verifier decide exactly (README.md, "How the verifier
 * decides").
 */
#ifndef UFFDLAB_STAMP_H
#define UFFDLAB_STAMP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STAMP_SLOTS 65         /* MAX_PART: words 0..64 are writer slots */

enum stamp_how {
	HOW_STORE = 1,     /* CPU store through the mapping */
	HOW_PWRITE = 2,    /* pwrite(2) on the backing fd */
	HOW_KREAD = 3,     /* read(2) from a pipe into the mapping (kernel write) */
	HOW_KPVW = 4,      /* process_vm_writev(2) into the mapping (kernel write) */
};

struct stamp {
	unsigned how, epoch;
	uint64_t seq;
};

/* Encode/decode the stamp word of slot `slot` in page `page`. */
uint64_t stamp_word(uint64_t page, unsigned slot, unsigned how, unsigned epoch, uint64_t seq);
bool stamp_decode(uint64_t word, uint64_t page, unsigned slot, struct stamp *out);

/* The value every word of an untouched page has. */
uint64_t page_pattern_word(uint64_t page, size_t word, bool prefilled);
void page_prefill(void *page, size_t psz, uint64_t idx);
bool page_is_zero(const void *page, size_t psz);

/* ---- verifier ---- */

enum cause {
	CAUSE_WP_MISSED,      /* a registered, armed writer's write leaked: kernel or tool bug */
	CAUSE_STAGGERED,      /* written by a registered writer before it was armed */
	CAUSE_UNREGISTERED,   /* written by a writer that never registered */
	CAUSE_FORK_CHILD,     /* written by a fork child (no EVENT_FORK) */
	CAUSE_FD_WRITE,       /* pwrite on the fd: never seen by uffd-wp */
	CAUSE_KERNEL_WRITE,   /* read(2)/process_vm_writev into the mapping */
	CAUSE_PUNCH_HOLE,     /* fallocate(PUNCH_HOLE) zeroed it (or dropped its protection: below) */
	CAUSE_ZEROED,         /* zero page where content was expected (zap on anon, ...) */
	CAUSE_INVALID,        /* corrupted content: no writer wrote this */
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
	unsigned arm_epoch;         /* stamps with epoch >= arm_epoch came after the instant */
	const uint8_t *roles;       /* enum role by participant id (= slot) */
	unsigned nroles;
	bool staggered;             /* registered writers were armed one by one */
	/*
	 * The punched range, and the pages of it copied before the punch began
	 * (bitmap; NULL: none).  Truncation drops the uffd-wp marker of a
	 * punched page in every process when the page is mapped anywhere at
	 * that moment (ZAP_FLAG_DROP_MARKER: by design, not a lost fault), so
	 * a registered writer's later write to it may land unannounced.  A
	 * punched page copied after the punch began is then punch-hole, also
	 * when it holds such a write; one copied before is judged as any page.
	 */
	uint64_t punch_first, punch_pages;
	const uint64_t *pre_punch;
};

struct verify_out {
	uint64_t mismatched;
	uint64_t by_cause[CAUSE_N];
	uint64_t first_bad[8];      /* a few mismatched pages, for debugging */
	uint8_t first_cause[8];
	int first_word[8];          /* the word that decided, -1 for whole-page causes */
	unsigned nfirst;
};

void verify_snapshot(const struct verify_in *in, struct verify_out *out);
/* Damage n pages of a snapshot on purpose (--corrupt-snapshot). */
void corrupt_snapshot(uint8_t *snap, size_t psz, uint64_t npages, uint64_t n);

#endif
