/* The part both static launchers share (agent.c: the frozen agent; bootstrap.c: the self-unpacking bootstrapper).
 *
 * The frozen programs carry their own C runtime: the dynamic loader (ld-linux-x86-64.so.2) and every library their
 * ELF files need, beside the PyInstaller program in one runtime directory. A launcher is a static executable (it
 * needs no libc of the host), refuses a kernel older than the bundled libc supports with a clear error instead of a
 * loader crash, and executes
 *
 *     RUNTIME/ld-linux-x86-64.so.2 --library-path RUNTIME RUNTIME/PROGRAM ARGS...
 *
 * so that the host's loader and libc are never used. PyInstaller's bootloader, started that way, sees that
 * /proc/self/exe is a loader, takes its own path from argv[0] and restarts itself through the same loader.
 *
 * Built by packaging/build.py with: gcc -static -Os -DKERNEL_FLOOR_MAJOR=.. -DKERNEL_FLOOR_MINOR=.. */
#ifndef MOBILITY_RUNTIME_H
#define MOBILITY_RUNTIME_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef KERNEL_FLOOR_MAJOR
#error "KERNEL_FLOOR_MAJOR and KERNEL_FLOOR_MINOR come from the bundled libc (packaging/build.py)"
#endif

#define LOADER "ld-linux-x86-64.so.2"
#define EXIT_ERROR 1
#define EXIT_UNSUPPORTED 3

/* The remediations of these IDs are the ones in agent/errors.py, agent/lifecycle/prereq/prerequisites.py and docs/errors.md; the
 * packaging tests compare what the launchers print with them. */
#define FIX_KERNEL \
    "Run the agent on a kernel at or above the floor in the message (a supported release, docs/support-matrix.md); " \
    "older kernels cannot run its bundled C library."
#define FIX_RUNTIME \
    "Reinstall the agent from its bundle, or download the bootstrapper again: the runtime files beside the " \
    "launcher are missing or damaged."

static void fail(int code, const char *id, const char *fix, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));

static void fail(int code, const char *id, const char *fix, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "error %s: ", id);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n  fix: %s\n", fix);
    exit(code);
}

/* The running kernel's release: /proc/sys/kernel/osrelease (what `uname -r` prints), else uname(2) when /proc is not
 * mounted. Read from /proc first so that a test can show an old release to this check with a bind mount. */
static void kernel_release(char *out, size_t size)
{
    int fd = open("/proc/sys/kernel/osrelease", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, out, size - 1);
        close(fd);
        if (n > 0) {
            out[n] = 0;
            out[strcspn(out, "\n")] = 0;
            if (out[0])
                return;
        }
    }
    struct utsname u;
    if (uname(&u) == 0) {
        snprintf(out, size, "%s", u.release);
        return;
    }
    snprintf(out, size, "unknown");
}

/* Refuse a kernel older than the bundled C library's floor (its ELF ABI note), before the loader would abort. An
 * unparsable release is let through: the loader will say what it thinks. */
static void check_kernel(void)
{
    char release[128];
    unsigned major, minor;
    kernel_release(release, sizeof(release));
    if (sscanf(release, "%u.%u", &major, &minor) != 2)
        return;
    if (major < KERNEL_FLOOR_MAJOR || (major == KERNEL_FLOOR_MAJOR && minor < KERNEL_FLOOR_MINOR))
        fail(EXIT_UNSUPPORTED, "PRQ-KERNEL", FIX_KERNEL,
             "Linux %s is older than %d.%d, the oldest kernel the agent's bundled C library runs on", release,
             KERNEL_FLOOR_MAJOR, KERNEL_FLOOR_MINOR);
}

/* This executable's own path, symbolic links resolved: /proc/self/exe, else argv[0] (a chroot without /proc). */
static int self_path(const char *argv0, char *out)
{
    if (realpath("/proc/self/exe", out))
        return 0;
    if (strchr(argv0, '/') && realpath(argv0, out))
        return 0;
    const char *path = getenv("PATH");
    if (!path)
        return -1;
    char candidate[PATH_MAX];
    for (const char *p = path; *p;) {
        size_t len = strcspn(p, ":");
        if (snprintf(candidate, sizeof(candidate), "%.*s/%s", (int)len, p, argv0) < (int)sizeof(candidate)
            && access(candidate, X_OK) == 0 && realpath(candidate, out))
            return 0;
        p += len + (p[len] == ':');
    }
    return -1;
}

/* Replace this process by RUNTIME/PROGRAM started through the bundled loader; returns only on failure. */
static void exec_runtime(const char *runtime, const char *program, int argc, char **argv)
{
    char loader[PATH_MAX], target[PATH_MAX];
    if (snprintf(loader, sizeof(loader), "%s/%s", runtime, LOADER) >= (int)sizeof(loader)
        || snprintf(target, sizeof(target), "%s/%s", runtime, program) >= (int)sizeof(target))
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "path too long: %s", runtime);
    char **args = calloc((size_t)argc + 4, sizeof(char *));
    if (!args)
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "out of memory");
    args[0] = loader;
    args[1] = "--library-path";
    args[2] = (char *)runtime;
    args[3] = target;
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(loader, args);
    fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "cannot run %s: %s", loader, strerror(errno));
}

#endif
