/*
 * ksm_many_processes: many processes, one content.  The kernel's selftests
 * merge within one process; KSM's purpose (qemu-kvm guests) is merging
 * across processes, so this case spreads the ksm_tests -M workload over P
 * processes, each opening /dev/ksm, creating its own SMA and registering
 * its own M pages of the same content.
 *
 *  - all P * M pages share one page: pages_shared 1, pages_sharing P*M - 1,
 *    and each process's ksm_merging_pages reads M;
 *  - half the processes exit: their SMAs are released, the rest still share:
 *    pages_shared 1, pages_sharing (P/2)*M - 1;
 *  - the others exit: 0, 0.
 *
 * 2009 difference: with P*M = 320 > 256 copies, a kernel with
 * max_page_sharing 256 would show pages_shared 2, pages_sharing 318; the
 * 2009 driver has no such limit (1, 319), asserted here.
 *
 *   ksm_many_processes [P [M]]     (default 8 processes of 40 pages)
 */
#include <signal.h>
#include <sys/wait.h>

#include "ksm_selftest.h"

static void child(int ready_fd, unsigned long m)
{
	char *buf = st_alloc(m, 0x5a);
	int ksm = st_open();
	int sma = ksm >= 0 ? st_create_sma(ksm) : -1;
	char ok = buf && sma >= 0 && st_register(sma, buf, m) == 0 ? 'y' : 'n';

	if (write(ready_fd, &ok, 1) != 1)
		_exit(1);
	for (;;)
		pause(); /* until killed: exit closes the SMA */
}

int main(int argc, char **argv)
{
	unsigned long p = argc > 1 ? strtoul(argv[1], NULL, 0) : 8;
	unsigned long m = argc > 2 ? strtoul(argv[2], NULL, 0) : 40;
	unsigned long total = p * m, i, good = 0, right = 0;
	double t = st_timeout();
	pid_t pids[256];
	int pipefd[2], ksm, status;

	st_begin("ksm_many_processes");
	ST_REQUIRE(p >= 2 && p <= 256, "2 to 256 processes (%lu)", p);
	ST_REQUIRE(st_wait_idle(t), "no shared pages left from earlier tests");
	ksm = st_open();
	ST_REQUIRE(ksm >= 0 && pipe(pipefd) == 0, "open %s", st_device());
	for (i = 0; i < p; i++) {
		pids[i] = fork();
		if (pids[i] == 0) {
			close(pipefd[0]);
			child(pipefd[1], m);
		}
		ST_REQUIRE(pids[i] > 0, "fork child %lu", i);
	}
	close(pipefd[1]);
	for (i = 0; i < p; i++) {
		char ok;

		if (read(pipefd[0], &ok, 1) == 1 && ok == 'y')
			good++;
	}
	st_check(good == p, "%lu processes each created an SMA and registered %lu pages (%lu did)", p, m, good);
	ST_REQUIRE(st_start(ksm, total, 10000) == 0, "start the scanner: %lu pages every 10 ms", total);

	st_check_counts(1, (long)total - 1, t, "%lu copies in %lu processes", total, p);
	if (total > 256)
		st_note("2009 semantics: no max_page_sharing (a kernel with 256 would show %lu, %lu)",
			(total + 255) / 256, total - (total + 255) / 256);
	for (i = 0; i < p; i++)
		right += st_merging_pages(pids[i]) == (long)m;
	st_check(right == p, "every process's ksm_merging_pages reads %lu (%lu of %lu do)", m, right, p);

	for (i = 0; i < p / 2; i++) {
		kill(pids[i], SIGKILL);
		waitpid(pids[i], &status, 0);
	}
	/* Their SMAs are released when the kernel sends the daemon the last close: soon after the exit. */
	st_check_counts(1, (long)((p - p / 2) * m) - 1, 10, "%lu processes exited", p / 2);
	st_check(st_merging_pages(pids[0]) == 0, "an exited process has no processes/ entry");

	for (; i < p; i++) {
		kill(pids[i], SIGKILL);
		waitpid(pids[i], &status, 0);
	}
	st_check_counts(0, 0, 10, "all exited");
	st_stop(ksm);
	close(ksm);
	return st_done();
}
