/* A machine's wall clock stepped for its processes only, for the update tests and bench/update.py: preloaded
 * (LD_PRELOAD) into the agent's programs, it adds to CLOCK_REALTIME the number of seconds the file named by
 * MOBILITY_TEST_CLOCK holds (read again at most once a second), as an NTP step or a resumed VM moves the wall clock;
 * CLOCK_MONOTONIC and every sleep are left alone, as a real step leaves them. The host's clock, which other jobs
 * share, is never touched. (A time namespace offsets only the monotonic and boot clocks; libfaketime 0.9.10 with
 * the monotonic clock left alone turns Python's absolute monotonic sleeps into EINVAL.) Test-only: never in a
 * product; built by tests/integration/fleet.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static volatile long offset;     /* seconds added to the wall clock */
static volatile time_t read_at;  /* monotonic second of the last read of the file */

static clock_gettime_fn real(void) {
    static clock_gettime_fn fn;
    if (!fn) fn = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    return fn;
}

static void refresh(void) {
    struct timespec now;
    if (real()(CLOCK_MONOTONIC, &now) != 0 || now.tv_sec == read_at) return;
    read_at = now.tv_sec;
    const char *path = getenv("MOBILITY_TEST_CLOCK");
    if (!path) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    char buf[32];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    char *end;
    long value = strtol(buf, &end, 10);
    if (end != buf) offset = value;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int r = real()(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        refresh();
        ts->tv_sec += offset;
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
