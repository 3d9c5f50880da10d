/*
 * ksm_zero_pages: port of the kernel selftest "KSM zero page merging"
 * (ksm_tests -Z) to the 2009 /dev/ksm API.
 *
 * N pages written with zeros (so present in memory, not the shared zero
 * page) are registered and scanned.
 *
 * 2009 difference: today's kernels have use_zero_pages; with it set, empty
 * pages are mapped to the kernel's zero page and pages_shared/pages_sharing
 * stay 0 (ksm_tests -Z -z 1 expects 0 merged pages).  The 2009 driver has no
 * such switch: zero-filled pages are merged like any other content, into one
 * shared page: pages_shared 1, pages_sharing N - 1, asserted here (it is
 * also what ksm_tests -Z -z 0 expects).  A second region of another content
 * checks that zero pages do not absorb it.
 */
#include "ksm_selftest.h"

int main(void)
{
	const unsigned long n = 128, m = 32;
	double t = st_timeout();
	struct st_counts c;
	char *zero, *other;
	int ksm, sma;

	st_begin("ksm_zero_pages");
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	ST_REQUIRE(ksm >= 0, "open %s", st_device());
	sma = st_create_sma(ksm);
	ST_REQUIRE(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA");
	zero = st_alloc(n, 0);
	other = st_alloc(m, 0x11);
	ST_REQUIRE(zero && other, "%lu zero-filled pages (written) and %lu pages of 0x11", n, m);
	ST_REQUIRE(st_register(sma, zero, n) == 0 && st_register(sma, other, m) == 0, "register both");
	ST_REQUIRE(st_start(ksm, n + m, 10000) == 0, "start the scanner");
	st_check(st_wait_scans(3, t), "three full scans");
	c = st_settle(2, t);
	st_check(c.shared == 2 && c.sharing == (long)(n - 1 + m - 1),
		 "zero pages merge like any content: pages_shared 2, pages_sharing %lu (got %ld, %ld)",
		 n - 1 + m - 1, c.shared, c.sharing);
	st_note("2009 semantics: no use_zero_pages; a kernel with use_zero_pages=1 would not count the %lu zero "
		"pages (pages_shared 1, pages_sharing %lu)", n, m - 1);
	ST_REQUIRE(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "REMOVE");
	st_stop(ksm);
	close(sma);
	close(ksm);
	return st_done();
}
