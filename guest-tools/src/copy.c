/* SPDX-License-Identifier: MIT */
/* copy.c - see copy.h */
#include "copy.h"
#include "coord.h"
#include "report.h"
#include "uffd.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <sched.h>
#include <string.h>

#define COPY_RUN 32          /* pages claimed at once by the copier */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#else
	sched_yield();
#endif
}

/* Pages per COPY_CHUNK_BYTES: at least one (huge pages). */
static uint64_t chunk_pages(const struct coord *c)
{
	return COPY_CHUNK_BYTES / c->psz ? COPY_CHUNK_BYTES / c->psz : 1;
}

/*
 * Bulk copies use non-temporal stores: the snapshot is written once and
 * not read back soon, so streaming it past the cache saves the
 * read-for-ownership of every destination line.  glibc memcpy only does
 * this for copies larger than our runs.
 */
static void copy_stream(uint8_t *dst, const uint8_t *src, size_t n)
{
#if defined(__SSE2__)
	__m128i *d = (__m128i *)(void *)dst;
	const __m128i *s = (const __m128i *)(const void *)src;

	for (size_t i = 0; i < n / 16; i += 4) {
		__m128i a = _mm_load_si128(s + i), b = _mm_load_si128(s + i + 1);
		__m128i x = _mm_load_si128(s + i + 2), y = _mm_load_si128(s + i + 3);

		_mm_stream_si128(d + i, a);
		_mm_stream_si128(d + i + 1, b);
		_mm_stream_si128(d + i + 2, x);
		_mm_stream_si128(d + i + 3, y);
	}
	_mm_sfence();    /* visible before the page is marked copied */
#else
	memcpy(dst, src, n);
#endif
}

void copy_pages(struct coord *c, uint64_t first, uint64_t n)
{
	copy_stream(c->snap + first * c->psz, c->ram + first * c->psz, n * c->psz);
}

static bool claim(struct coord *c, uint64_t p)
{
	uint8_t expect = PAGE_TODO;

	return atomic_compare_exchange_strong(&c->pstate[p], &expect, PAGE_COPYING);
}

static void wait_copied(struct coord *c, uint64_t p)
{
	while (atomic_load_explicit(&c->pstate[p], memory_order_acquire) != PAGE_COPIED)
		cpu_relax();
}

void copy_page_claimed(struct coord *c, uint64_t p)
{
	if (claim(c, p)) {
		copy_pages(c, p, 1);
		atomic_store_explicit(&c->pstate[p], PAGE_COPIED, memory_order_release);
		atomic_fetch_add(&c->copied, 1);
		return;
	}
	wait_copied(c, p);    /* the copier has it: at most COPY_RUN pages */
}

/* Un-protect [first, first+n) in every process once all of it is copied,
 * so later writes there don't fault (QEMU does the same per saved run). */
static void release_chunk(struct coord *c, uint64_t first, uint64_t n)
{
	for (int i = 0; i < c->nproc; i++) {
		struct proc *p = &c->proc[i];

		if (p->uffd >= 0)
			uffd_wp_or_die(p->uffd, p->base + first * c->psz, n * c->psz,
				       false, false, "a copied chunk");
	}
}

void copy_all_claimed(struct coord *c)
{
	uint64_t chunk = chunk_pages(c);
	uint64_t p = 0, released = 0;

	c->doing = "copying";
	while (p < c->npages) {
		uint64_t q = p;

		while (q < c->npages && q - p < COPY_RUN && claim(c, q))
			q++;
		if (q == p) {          /* the handler has p: wait for it at release */
			p++;
		} else {
			copy_pages(c, p, q - p);
			for (uint64_t r = p; r < q; r++)
				atomic_store_explicit(&c->pstate[r], PAGE_COPIED,
						      memory_order_release);
			atomic_fetch_add(&c->copied, q - p);
			p = q;
		}
		if (p - released >= chunk || p == c->npages) {
			for (uint64_t r = released; r < p; r++)    /* pages the handler held */
				wait_copied(c, r);
			if (c->o->release == REL_CHUNK)
				release_chunk(c, released, p - released);
			released = p;
			coord_check(c);
			report_progress(c, "copy", false);
		}
	}
}

void copy_all_plain(struct coord *c)
{
	uint64_t step = chunk_pages(c);

	c->doing = "copying";
	for (uint64_t p = 0; p < c->npages; p += step) {
		uint64_t n = c->npages - p < step ? c->npages - p : step;

		copy_pages(c, p, n);
		atomic_fetch_add(&c->copied, n);
		coord_check(c);
		report_progress(c, "copy", false);
	}
}
