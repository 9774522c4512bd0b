/* stamp.c - see stamp.h */
#include "stamp.h"
#include "util.h"

#include <string.h>

const char *const cause_names[CAUSE_N] = {
	[CAUSE_WP_MISSED] = "wp-missed",
	[CAUSE_STAGGERED] = "staggered",
	[CAUSE_UNREGISTERED] = "unregistered",
	[CAUSE_FORK_CHILD] = "fork-child",
	[CAUSE_FD_WRITE] = "fd-write",
	[CAUSE_KERNEL_WRITE] = "kernel-write",
	[CAUSE_PUNCH_HOLE] = "punch-hole",
	[CAUSE_ZEROED] = "zeroed",
	[CAUSE_INVALID] = "invalid-content",
	[CAUSE_STALE] = "stale",
};

static uint64_t stamp_hash(const struct stamp *s)
{
	uint64_t h = mix64(((uint64_t)s->magic << 32) ^ ((uint64_t)s->writer << 16) ^ s->how);

	h = mix64(h ^ ((uint64_t)s->epoch << 32) ^ s->reserved);
	h = mix64(h ^ s->page);
	return mix64(h ^ s->seq);
}

void stamp_make(struct stamp *s, uint16_t writer, uint16_t how, uint32_t epoch,
		uint64_t page, uint64_t seq)
{
	s->magic = STAMP_MAGIC;
	s->writer = writer;
	s->how = how;
	s->epoch = epoch;
	s->reserved = 0;
	s->page = page;
	s->seq = seq;
	s->check = stamp_hash(s);
	for (int i = 0; i < 3; i++)
		s->tail[i] = mix64(s->check + (uint64_t)i + 1);
}

bool stamp_valid(const struct stamp *s, uint64_t page)
{
	if (s->magic != STAMP_MAGIC || s->page != page || s->check != stamp_hash(s))
		return false;
	for (int i = 0; i < 3; i++)
		if (s->tail[i] != mix64(s->check + (uint64_t)i + 1))
			return false;
	return true;
}

static inline uint64_t body_word(uint64_t idx, size_t w)
{
	return mix64((idx << 20) ^ (uint64_t)w) | 1;   /* never zero */
}

void page_prefill(void *page, size_t psz, uint64_t idx)
{
	uint64_t *w = page;

	stamp_make(page, PREFILL_WRITER, HOW_PREFILL, 0, idx, 0);
	for (size_t i = STAMP_BYTES / 8; i < psz / 8; i++)
		w[i] = body_word(idx, i);
}

bool page_body_ok(const void *page, size_t psz, uint64_t idx, bool prefilled)
{
	const uint64_t *w = page;

	for (size_t i = STAMP_BYTES / 8; i < psz / 8; i++)
		if (w[i] != (prefilled ? body_word(idx, i) : 0))
			return false;
	return true;
}

bool page_is_zero(const void *page, size_t psz)
{
	const uint64_t *w = page;

	for (size_t i = 0; i < psz / 8; i++)
		if (w[i])
			return false;
	return true;
}

/* Why does a stamp written after the instant sit in the snapshot? */
static enum cause cause_of_late_stamp(const struct verify_in *in, const struct stamp *s)
{
	if (s->how == HOW_PWRITE)
		return CAUSE_FD_WRITE;
	if (s->how == HOW_KREAD || s->how == HOW_KPVW)
		return CAUSE_KERNEL_WRITE;
	if (s->writer < in->nroles) {
		if (in->roles[s->writer] == ROLE_UNREGISTERED)
			return CAUSE_UNREGISTERED;
		if (in->roles[s->writer] == ROLE_FORK_CHILD)
			return CAUSE_FORK_CHILD;
	}
	return in->staggered ? CAUSE_STAGGERED : CAUSE_WP_MISSED;
}

static bool in_punch(const struct verify_in *in, uint64_t p)
{
	return in->punch_pages && p >= in->punch_first &&
	       p < in->punch_first + in->punch_pages;
}

static bool written_at_instant(const struct verify_in *in, uint64_t p)
{
	if (in->prefilled)
		return true;
	return in->written && (in->written[p / 64] >> (p % 64) & 1);
}

/*
 * Stamp mode: the copy of page p was taken at or after the instant.  Every
 * mutation after the instant either stamps epoch >= arm_epoch or zeroes the
 * page, and nothing ever writes an older stamp back, so a valid stamp from
 * before the instant proves the page did not change between the instant and
 * its copy.  Returns -1 when the page matches, else the cause.
 */
static int check_page_stamp(const struct verify_in *in, uint64_t p, const uint8_t *pg)
{
	const struct stamp *s = (const struct stamp *)pg;

	if (page_is_zero(pg, in->psz)) {
		if (!written_at_instant(in, p))
			return -1;
		return in_punch(in, p) ? CAUSE_PUNCH_HOLE : CAUSE_ZEROED;
	}
	if (!stamp_valid(s, p) || !page_body_ok(pg, in->psz, p, in->prefilled))
		return CAUSE_INVALID;
	if (s->epoch >= in->arm_epoch)
		return cause_of_late_stamp(in, s);
	if (!written_at_instant(in, p))
		return CAUSE_INVALID;     /* content where there was none */
	return -1;
}

/* Copy mode: bytes decide; stamps only explain the difference. */
static int check_page_copy(const struct verify_in *in, uint64_t p,
			   const uint8_t *pg, const uint8_t *ref)
{
	const struct stamp *s = (const struct stamp *)pg;
	const struct stamp *r = (const struct stamp *)ref;

	if (!memcmp(pg, ref, in->psz))
		return -1;
	if (page_is_zero(pg, in->psz))
		return in_punch(in, p) ? CAUSE_PUNCH_HOLE : CAUSE_ZEROED;
	if (!stamp_valid(s, p) || !page_body_ok(pg, in->psz, p, in->prefilled))
		return CAUSE_INVALID;
	if (s->epoch >= in->arm_epoch)
		return cause_of_late_stamp(in, s);
	/* The snapshot is older than the instant: blame the write it missed. */
	if (stamp_valid(r, p) && r->how != HOW_PREFILL) {
		enum cause c = cause_of_late_stamp(in, r);

		return c == CAUSE_WP_MISSED || c == CAUSE_STAGGERED ? CAUSE_STALE : (int)c;
	}
	return CAUSE_STALE;
}

void verify_snapshot(const struct verify_in *in, struct verify_out *out)
{
	memset(out, 0, sizeof(*out));
	for (uint64_t p = 0; p < in->npages; p++) {
		const uint8_t *pg = in->snap + p * in->psz;
		int c = in->ref ? check_page_copy(in, p, pg, in->ref + p * in->psz)
				: check_page_stamp(in, p, pg);

		if (c < 0)
			continue;
		out->mismatched++;
		out->by_cause[c]++;
		if (out->nfirst < 8)
			out->first_bad[out->nfirst++] = p;
	}
}

void corrupt_snapshot(uint8_t *snap, size_t psz, uint64_t npages, uint64_t n)
{
	/* Spread the damage and vary it: a body byte, a stamp byte. */
	for (uint64_t i = 0; i < n && i < npages; i++) {
		uint64_t p = (i * npages) / n;
		size_t off = (i & 1) ? 8 : psz / 2;

		snap[p * psz + off] ^= 0x5a;
	}
}
