/*
 * ksm_cow: port of the kernel selftest "KSM COW time" (ksm_tests -C) to the
 * 2009 /dev/ksm API.
 *
 * 4000 pages: first one byte is written in every other page, unmerged, and
 * timed.  Then the pages are made 2000 pairs of duplicates (pair k: the first
 * k + 1 bytes '+', the rest '*'), registered and merged: pages_shared 2000,
 * pages_sharing 2000.  Then the same writes are timed again, on merged pages.
 * The kernel selftest only reports the two times; this port also checks what
 * the writes did to the counters: each shared page lost one of its two
 * sharers, so after the next passes pages_sharing is 0 while pages_shared
 * stays 2000 (a shared page lives as long as one page maps it).  Then REMOVE
 * gives 0, 0.
 *
 * Emulator difference (not a 2009 one): the 2009 kernel write-protected merged
 * pages, so the timed writes took COW faults.  The emulator cannot intercept
 * a write (it never changes the process's memory): the writes cost what
 * unmerged writes cost, and the break is seen on the scanner's next pass.
 * The times are printed, not asserted.
 */
#include "ksm_selftest.h"

static double write_every_other(char *buf, unsigned long n)
{
	double t0 = st_now();

	for (unsigned long i = 0; i + 1 < n; i += 2)
		buf[i * PAGE] = '-';
	return st_now() - t0;
}

int main(void)
{
	const unsigned long n = 4000, pairs = n / 2;
	double t = st_timeout(), dt;
	struct st_counts c;
	int ksm, sma;
	char *buf;

	st_begin("ksm_cow");
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	sma = ksm >= 0 ? st_create_sma(ksm) : -1;
	ST_REQUIRE(sma >= 0, "open %s and create an SMA", st_device());
	buf = st_alloc(n, '*');
	ST_REQUIRE(buf != NULL, "%lu pages", n);

	dt = write_every_other(buf, n);
	st_note("unmerged: %lu writes in %.6f s, %.1f MiB/s", pairs, dt, pairs * PAGE / 1048576.0 / dt);

	for (unsigned long i = 0; i + 1 < n; i += 2) {
		memset(buf + i * PAGE, '*', PAGE);
		memset(buf + i * PAGE, '+', i / 2 + 1);
		memcpy(buf + (i + 1) * PAGE, buf + i * PAGE, PAGE);
	}
	ST_REQUIRE(st_register(sma, buf, n) == 0, "register %lu pages (%lu pairs of duplicates)", n, pairs);
	ST_REQUIRE(st_start(ksm, n, 10000) == 0, "start the scanner");
	st_check_counts((long)pairs, (long)pairs, t, "%lu pairs merged", pairs);

	dt = write_every_other(buf, n);
	st_note("merged: %lu writes in %.6f s, %.1f MiB/s (emulator: no COW fault, see the comment)", pairs, dt,
		pairs * PAGE / 1048576.0 / dt);
	st_check(st_wait_scans(2, t), "two full scans after the writes");
	c = st_settle(2, t);
	st_check(c.shared == (long)pairs && c.sharing == 0,
		 "one sharer of each pair written: pages_shared %lu, pages_sharing 0 (got %ld, %ld)", pairs, c.shared,
		 c.sharing);
	st_check(st_merging_pages(getpid()) == (long)pairs, "ksm_merging_pages reads %lu (got %ld)", pairs,
		 st_merging_pages(getpid()));
	ST_REQUIRE(ioctl(sma, KSM_REMOVE_MEMORY_REGION, 0) == 0, "REMOVE");
	c = st_counts();
	st_check(c.shared == 0 && c.sharing == 0, "after REMOVE: 0, 0 (got %ld, %ld)", c.shared, c.sharing);
	st_stop(ksm);
	close(sma);
	close(ksm);
	return st_done();
}
