/*
 * A caller that is already being traced (as under a debugger) cannot be
 * handed an SMA fd: CREATE fails with EBUSY, and the device keeps working.
 */
#include <fcntl.h>
#include <linux/ksm.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

int main(void)
{
	int go[2], status;
	pid_t child;

	if (pipe(go) != 0)
		return 2;
	child = fork();
	if (child == 0) {
		char c;
		int fd, sma, err, version;

		if (read(go[0], &c, 1) != 1)
			_exit(2);
		fd = open("/dev/ksm", O_RDWR);
		errno = 0;
		sma = ioctl(fd, KSM_CREATE_SHARED_MEMORY_AREA, 0);
		err = errno;
		version = ioctl(fd, KSM_GET_API_VERSION, 0);
		/* exit code: 0 = EBUSY as documented, then the device still answers */
		_exit(sma == -1 && err == EBUSY && version == 1 ? 0 : 10 + (sma >= 0));
	}
	CHECK(ptrace(PTRACE_SEIZE, child, 0, 0) == 0, "parent traces its child, as a debugger would");
	CHECK(write(go[1], "g", 1) == 1, "child told to go");
	while (waitpid(child, &status, __WALL) == child && !WIFEXITED(status) && !WIFSIGNALED(status))
		ptrace(PTRACE_CONT, child, 0, 0);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "CREATE from a traced thread fails with EBUSY and the device keeps answering (child status %d)",
	      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	CHECK_DONE();
}
