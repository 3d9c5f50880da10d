/*
 * ksm_merge_time: port of the kernel selftests "KSM merge time" (ksm_tests
 * -P) and "KSM unmerge time" (ksm_tests -D) to the 2009 /dev/ksm API.
 *
 * S MiB of identical pages are registered and the scanner started; the time
 * until every page is merged (pages_sharing = N - 1) gives the merge rate,
 * and the time of one full scan of merged memory is measured from the
 * full_scans counter.  Then KSM_REMOVE_MEMORY_REGION (the 2009 unmerge) is
 * timed.  The selftest only reports the figures; this port asserts that the
 * merge completes within the time limit, with the right counts, and that
 * REMOVE leaves 0, 0.  The rates are printed ("# rate ...").
 *
 *   ksm_merge_time [MIB]        (default 8)
 */
#include "ksm_selftest.h"

int main(int argc, char **argv)
{
	unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 8;
	unsigned long n = mib * 256;
	double t = st_timeout(), t0, merge_s, scan_s, rm_s;
	struct st_counts c;
	long s0;
	int ksm, sma;
	char *buf;

	st_begin("ksm_merge_time");
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	sma = ksm >= 0 ? st_create_sma(ksm) : -1;
	ST_REQUIRE(sma >= 0, "open %s and create an SMA", st_device());
	buf = st_alloc(n, '*');
	ST_REQUIRE(buf != NULL, "%lu MiB (%lu pages) of '*'", mib, n);

	t0 = st_now();
	ST_REQUIRE(st_register(sma, buf, n) == 0, "register %lu pages", n);
	/* As the selftest: the whole area per round, no sleep. */
	ST_REQUIRE(st_start(ksm, n, 0) == 0, "start the scanner: %lu pages per round, sleep 0", n);
	st_check_counts(1, (long)n - 1, t, "%lu MiB merged within %.0f s", mib, t);
	merge_s = st_now() - t0;
	st_note("rate merge: %lu MiB in %.3f s, %.2f MiB/s", mib, merge_s, mib / merge_s);

	s0 = st_stat("full_scans");
	st_wait_scans_from(s0, 1, t);
	t0 = st_now();
	st_check(st_wait_scans_from(s0, 3, t), "two more full scans");
	scan_s = (st_now() - t0) / 2;
	st_note("rate scan: one full scan of %lu merged MiB in %.3f s, %.2f MiB/s", mib, scan_s, mib / scan_s);

	t0 = st_now();
	st_check(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "KSM_REMOVE_MEMORY_REGION");
	rm_s = st_now() - t0;
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0, "after REMOVE: 0, 0 (got %ld, %ld)", c.shared, c.sharing);
	st_note("rate unmerge: REMOVE of %lu MiB in %.4f s, %.1f MiB/s", mib, rm_s, mib / rm_s);
	st_stop(ksm);
	close(sma);
	close(ksm);
	return st_done();
}
