/*
 * ksm_unmerge: port of the kernel selftests "KSM unmerging" (ksm_tests -U)
 * and ksm_functional_tests' test_unmerge / test_unmerge_discarded to the
 * 2009 /dev/ksm API.
 *
 *  1. on write: two merged pages, one byte of each changed differently;
 *     after the scanner's next passes nothing is shared any more (0, 0).
 *  2. REMOVE: N merged pages, KSM_REMOVE_MEMORY_REGION (the 2009 way to say
 *     MADV_UNMERGEABLE) drops them all at once: (0, 0) right after the ioctl.
 *  3. discarded: N merged pages, the first half thrown away with
 *     MADV_DONTNEED; the scanner drops the pages that are gone (1, N/2 - 1),
 *     then REMOVE leaves (0, 0).
 *  4. close: the last close() of the SMA fd acts as REMOVE.
 *
 * Emulator difference (not a 2009 one): the functional tests check that no
 * two pages map the same PFN any more (/proc/self/pagemap).  The emulator
 * never changes the scanned process's memory, so PFNs are never shared in
 * the first place; the counters are the observable.
 */
#include "ksm_selftest.h"

static int merged(int ksm, int sma, char *buf, unsigned long n, double t)
{
	if (st_register(sma, buf, n) != 0 || st_start(ksm, n, 10000) != 0)
		return 0;
	return st_wait_counts(1, (long)n - 1, t);
}

int main(void)
{
	const unsigned long n = 128;
	double t = st_timeout();
	struct st_counts c;
	long scans;
	int ksm, sma;
	char *buf;

	st_begin("ksm_unmerge");
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	ST_REQUIRE(ksm >= 0, "open %s", st_device());

	/* 1. unmerge on write (ksm_tests -U) */
	sma = st_create_sma(ksm);
	buf = st_alloc(2, '*');
	ST_REQUIRE(sma >= 0 && buf, "SMA and 2 pages of '*'");
	st_check(merged(ksm, sma, buf, 2, t), "2 identical pages merged: pages_shared 1, pages_sharing 1");
	buf[0] = '-';
	buf[PAGE] = '+';
	scans = st_stat("full_scans");
	/* Two passes: the one under way may have passed the pages before the writes. */
	st_check(st_wait_scans_from(scans, 2, t), "two full scans after the writes");
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0,
		 "on write: both pages changed, nothing shared any more (got pages_shared %ld, pages_sharing %ld)",
		 c.shared, c.sharing);
	ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0);
	munmap(buf, 2 * PAGE);

	/* 2. REMOVE (MADV_UNMERGEABLE) */
	buf = st_alloc(n, 0xcf);
	ST_REQUIRE(buf != NULL, "%lu pages of 0xcf", n);
	st_check(merged(ksm, sma, buf, n, t), "%lu identical pages merged", n);
	st_check(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "KSM_REMOVE_MEMORY_REGION returns 0");
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0 && st_merging_pages(getpid()) == 0,
		 "REMOVE unmerges at once: pages_shared 0, pages_sharing 0, ksm_merging_pages 0 (got %ld, %ld, %ld)",
		 c.shared, c.sharing, st_merging_pages(getpid()));

	/* 3. discarded pages (test_unmerge_discarded) */
	st_check(merged(ksm, sma, buf, n, t), "%lu pages merged again", n);
	st_check(madvise(buf, n / 2 * PAGE, MADV_DONTNEED) == 0, "MADV_DONTNEED on the first %lu pages", n / 2);
	st_check_counts(1, (long)(n / 2) - 1, t, "pages gone from memory leave the trees");
	st_check(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "REMOVE");
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0, "after REMOVE: 0, 0 (got %ld, %ld)", c.shared, c.sharing);

	/* 4. the last close of the SMA */
	memset(buf, 0xcf, n * PAGE);
	st_check(merged(ksm, sma, buf, n, t), "%lu pages merged once more", n);
	close(sma);
	st_check_counts(0, 0, 5, "close() of the SMA fd unmerges");

	st_stop(ksm);
	close(ksm);
	return st_done();
}
