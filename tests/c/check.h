/* Tiny TAP-style checks shared by the C integration programs. */
#ifndef KSM_CHECK_H
#define KSM_CHECK_H
#include <errno.h>
#include <stdio.h>
#include <string.h>

static int check_failures __attribute__((unused));

#define CHECK(cond, ...)                                                      \
	do {                                                                  \
		int ok_ = (cond);                                             \
		printf("%s - ", ok_ ? "ok" : "not ok");                       \
		printf(__VA_ARGS__);                                          \
		if (!ok_) {                                                   \
			printf("  (%s:%d: %s; errno %d %s)", __FILE__, __LINE__, \
			       #cond, errno, strerror(errno));                \
			check_failures++;                                     \
		}                                                             \
		printf("\n");                                                 \
		fflush(stdout);                                               \
	} while (0)

#define CHECK_DONE()                                                          \
	do {                                                                  \
		printf(check_failures ? "FAIL (%d)\n" : "PASS\n", check_failures); \
		return check_failures ? 1 : 0;                                \
	} while (0)

#endif
