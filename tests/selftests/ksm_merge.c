/*
 * ksm_merge: port of the kernel selftest "KSM merging" (ksm_tests -M, and its
 * -a r variant) to the 2009 /dev/ksm API.
 *
 * N pages filled with the same byte are registered through an SMA
 * (KSM_REGISTER_MEMORY_REGION instead of madvise(MADV_MERGEABLE)), the
 * scanner is started with KSM_START_STOP_KTHREAD (instead of writing 1 to
 * /sys/kernel/mm/ksm/run), and after the scanner's passes pages_shared and
 * pages_sharing must read 1 and N - 1.
 *
 * 2009 difference: the 2009 driver has no max_page_sharing.  Today's kernels
 * (default max_page_sharing 256) split more than 256 copies of one content
 * over several shared pages; with N = 300 they would show pages_shared 2,
 * pages_sharing 298.  The 2009 driver keeps one shared page for all of them:
 * 1 and 299, which is what is asserted here.
 *
 *   ksm_merge [NPAGES]        (default 300)
 */
#include "ksm_selftest.h"

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 300;
	unsigned long nro = 64;
	double t = st_timeout(), t0;
	int ksm, sma;
	char *buf, *ro;
	struct st_counts c;

	st_begin("ksm_merge");
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	ST_REQUIRE(ksm >= 0, "open %s", st_device());
	sma = st_create_sma(ksm);
	ST_REQUIRE(sma >= 0, "KSM_CREATE_SHARED_MEMORY_AREA");
	buf = st_alloc(n, '*');
	ST_REQUIRE(buf != NULL, "%lu pages filled with '*'", n);

	t0 = st_now();
	ST_REQUIRE(st_register(sma, buf, n) == 0, "KSM_REGISTER_MEMORY_REGION of %lu pages", n);
	ST_REQUIRE(st_start(ksm, n, 10000) == 0, "KSM_START_STOP_KTHREAD: %lu pages every 10 ms", n);
	/* Merging needs two passes (first sight, then the unstable tree); a
	 * third makes sure the pass we joined in the middle does not count. */
	st_check(st_wait_scans(3, t), "three full scans within %.0f s", t);
	c = st_counts();
	st_note("after %.2f s: pages_shared %ld, pages_sharing %ld, full_scans %ld", st_now() - t0, c.shared,
		c.sharing, st_stat("full_scans"));
	st_check(c.shared == 1 && c.sharing == (long)n - 1, "%lu identical pages: pages_shared 1, pages_sharing %lu "
		 "(got %ld, %ld)", n, n - 1, c.shared, c.sharing);
	if (n > 256)
		st_note("2009 semantics: no max_page_sharing, one shared page for all %lu copies (a kernel with "
			"max_page_sharing 256 shows %lu, %lu)", n, (n + 255) / 256, n - (n + 255) / 256);
	st_check(st_merging_pages(getpid()) == (long)n, "processes/%d/ksm_merging_pages reads %lu (got %ld)",
		 (int)getpid(), n, st_merging_pages(getpid()));

	/* ksm_tests -a r: read-only pages merge as well. */
	ro = st_alloc(nro, '#');
	ST_REQUIRE(ro != NULL && mprotect(ro, nro * PAGE, PROT_READ) == 0, "%lu more pages, then PROT_READ", nro);
	ST_REQUIRE(st_register(sma, ro, nro) == 0, "register the read-only pages through the same SMA");
	st_check_counts(2, (long)(n - 1 + nro - 1), t, "read-only pages merge too");

	ST_REQUIRE(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "KSM_REMOVE_MEMORY_REGION");
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0, "after REMOVE: pages_shared 0, pages_sharing 0 (got %ld, %ld)",
		 c.shared, c.sharing);
	st_stop(ksm);
	close(sma);
	close(ksm);
	return st_done();
}
