/* SPDX-License-Identifier: MIT */
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

/* Word layout: check:20 | epoch:1 | how:3 | seq:40 */
#define SEQ_BITS 40
#define SEQ_MASK ((1ULL << SEQ_BITS) - 1)
#define PAYLOAD_BITS 44

static uint64_t stamp_check(uint64_t page, unsigned slot, uint64_t payload)
{
	return mix64(mix64(page * 0x100000001B3ULL + slot) ^ payload) >> PAYLOAD_BITS;
}

uint64_t stamp_word(uint64_t page, unsigned slot, unsigned how, unsigned epoch, uint64_t seq)
{
	uint64_t payload = ((uint64_t)(epoch & 1) << 43) | ((uint64_t)(how & 7) << SEQ_BITS) |
			   (seq & SEQ_MASK);

	return (stamp_check(page, slot, payload) << PAYLOAD_BITS) | payload;
}

bool stamp_decode(uint64_t word, uint64_t page, unsigned slot, struct stamp *out)
{
	uint64_t payload = word & ((1ULL << PAYLOAD_BITS) - 1);
	unsigned how = (unsigned)(payload >> SEQ_BITS) & 7;

	if (word >> PAYLOAD_BITS != stamp_check(page, slot, payload) ||
	    how < HOW_STORE || how > HOW_KPVW)
		return false;
	out->how = how;
	out->epoch = (unsigned)(payload >> 43) & 1;
	out->seq = payload & SEQ_MASK;
	return true;
}

uint64_t page_pattern_word(uint64_t page, size_t word, bool prefilled)
{
	return prefilled ? mix64((page << 20) ^ (uint64_t)word ^ 0xA5A5ULL) | 1 : 0;
}

void page_prefill(void *page, size_t psz, uint64_t idx)
{
	uint64_t *w = page;

	for (size_t i = 0; i < psz / 8; i++)
		w[i] = page_pattern_word(idx, i, true);
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
static enum cause cause_of_stamp(const struct verify_in *in, unsigned slot, unsigned how)
{
	if (how == HOW_PWRITE)
		return CAUSE_FD_WRITE;
	if (how == HOW_KREAD || how == HOW_KPVW)
		return CAUSE_KERNEL_WRITE;
	if (slot < in->nroles) {
		if (in->roles[slot] == ROLE_UNREGISTERED)
			return CAUSE_UNREGISTERED;
		if (in->roles[slot] == ROLE_FORK_CHILD)
			return CAUSE_FORK_CHILD;
	}
	return in->staggered ? CAUSE_STAGGERED : CAUSE_WP_MISSED;
}

static bool in_punch(const struct verify_in *in, uint64_t p)
{
	return in->punch_pages && p >= in->punch_first &&
	       p < in->punch_first + in->punch_pages;
}

/* A punched page whose copy may have been taken once the punch began. */
static bool copied_after_punch(const struct verify_in *in, uint64_t p)
{
	return in_punch(in, p) && !(in->pre_punch && (in->pre_punch[p / 64] >> (p % 64) & 1));
}

static bool written_at_instant(const struct verify_in *in, uint64_t p)
{
	if (in->prefilled)
		return true;
	return in->written && (in->written[p / 64] >> (p % 64) & 1);
}

/* Classify one word of page p: -1 = a value it may legitimately have had
 * at the instant, else the cause of the difference. */
static int check_word(const struct verify_in *in, uint64_t p, size_t i, uint64_t w)
{
	struct stamp s;

	if (w == page_pattern_word(p, i, in->prefilled))
		return -1;
	if (i >= STAMP_SLOTS || !stamp_decode(w, p, (unsigned)i, &s))
		return in_punch(in, p) ? CAUSE_PUNCH_HOLE : CAUSE_INVALID;
	if (s.epoch >= in->arm_epoch) {
		int c = (int)cause_of_stamp(in, (unsigned)i, s.how);

		/* written after the punch dropped the page's protection */
		return c == CAUSE_WP_MISSED && copied_after_punch(in, p) ? CAUSE_PUNCH_HOLE : c;
	}
	if (!written_at_instant(in, p))
		return CAUSE_INVALID;     /* a pre-instant stamp where nothing was written */
	return -1;
}

/*
 * Stamp mode: page p was copied at or after the instant.  After the
 * instant a word only changes to an epoch-1 stamp or to zero (punch-hole),
 * so a word that holds its pattern or a pre-instant stamp still holds its
 * value of the instant.  Returns -1 when the page matches, else the cause
 * (and the deciding word in *word).
 */
static int check_page_stamp(const struct verify_in *in, uint64_t p, const uint8_t *pg, int *word)
{
	const uint64_t *w = (const uint64_t *)pg;

	*word = -1;
	if (page_is_zero(pg, in->psz)) {
		if (!written_at_instant(in, p))
			return -1;
		return in_punch(in, p) ? CAUSE_PUNCH_HOLE : CAUSE_ZEROED;
	}
	for (size_t i = 0; i < in->psz / 8; i++) {
		int c = check_word(in, p, i, w[i]);

		if (c >= 0) {
			*word = (int)i;
			return c;
		}
	}
	return -1;
}

/* Copy mode: bytes decide; stamps only explain the difference. */
static int check_page_copy(const struct verify_in *in, uint64_t p, const uint8_t *pg,
			   const uint8_t *ref, int *word)
{
	const uint64_t *w = (const uint64_t *)pg, *r = (const uint64_t *)ref;
	struct stamp s;

	*word = -1;
	if (!memcmp(pg, ref, in->psz))
		return -1;
	if (page_is_zero(pg, in->psz))
		return in_punch(in, p) ? CAUSE_PUNCH_HOLE : CAUSE_ZEROED;
	for (size_t i = 0; i < in->psz / 8; i++) {
		int c;

		if (w[i] == r[i])
			continue;
		*word = (int)i;
		c = check_word(in, p, i, w[i]);
		if (c >= 0)
			return c;
		/* the snapshot holds an older value: blame the write it missed */
		if (i < STAMP_SLOTS && stamp_decode(r[i], p, (unsigned)i, &s)) {
			c = cause_of_stamp(in, (unsigned)i, s.how);
			return c == CAUSE_WP_MISSED || c == CAUSE_STAGGERED ? CAUSE_STALE : c;
		}
		return CAUSE_STALE;
	}
	return CAUSE_INVALID;
}

void verify_snapshot(const struct verify_in *in, struct verify_out *out)
{
	memset(out, 0, sizeof(*out));
	for (uint64_t p = 0; p < in->npages; p++) {
		const uint8_t *pg = in->snap + p * in->psz;
		int word, c = in->ref ? check_page_copy(in, p, pg, in->ref + p * in->psz, &word)
				      : check_page_stamp(in, p, pg, &word);

		if (c < 0)
			continue;
		out->mismatched++;
		out->by_cause[c]++;
		if (out->nfirst < 8) {
			out->first_cause[out->nfirst] = (uint8_t)c;
			out->first_word[out->nfirst] = word;
			out->first_bad[out->nfirst++] = p;
		}
	}
}

void corrupt_snapshot(uint8_t *snap, size_t psz, uint64_t npages, uint64_t n)
{
	/* Spread the damage; alternate a body word and a stamp slot's check
	 * bits (a valid check for a flipped word is a 1-in-a-million accident). */
	for (uint64_t i = 0; i < n && i < npages; i++) {
		uint64_t p = (i * npages) / n;
		size_t off = (i & 1) ? 8 + 7 : psz / 2;

		snap[p * psz + off] ^= 0x5a;
	}
}
