/* `mobility-bootstrap`, the bootstrapper baked into templates: this static launcher with the one-dir frozen
 * bootstrapper (its PyInstaller program, libraries and C runtime) appended as one zlib-compressed payload.
 *
 * The first start unpacks the payload once into a cache directory named by the payload's identity (version and
 * content hash): /var/lib/mobility/bootstrap/<id>/ (root), ~/.cache/mobility/bootstrap/<id>/ (other users), or
 * $MOBILITY_BOOTSTRAP_CACHE/<id>/. Every start then executes <id>/PROGRAM through <id>/ld-linux-x86-64.so.2, so
 * the at-boot no-op does not unpack anything (a one-file PyInstaller program unpacks ~30 MB at every start).
 *
 * Unpacking is atomic: into .<id>.<pid>.tmp beside it, synced, then renamed. Two first starts at once each unpack
 * into their own directory and the second rename loses (its copy is removed); a start killed mid-unpack leaves a
 * .tmp directory that the next start removes once its process is gone. The zlib stream's Adler-32 is checked before
 * the rename, so a damaged file never becomes a cache entry. Caches of other payloads are removed after a new one is
 * in place (a newer bootstrapper replaced this one).
 *
 * Layout of this file: [static launcher][payload][trailer]; the payload is zlib over records
 *   u8 kind ('d' directory, 'f' file, 'E' end), u32 mode, u32 path length, u64 data length, path, data
 * (little-endian; paths relative, '/'-separated, parents before children), written by packaging/build.py. */
#define _GNU_SOURCE
#include "runtime.h"

#include <dirent.h>
#include <ftw.h>
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <zlib.h>

#ifndef PROGRAM
#define PROGRAM "mobility-bootstrap"
#endif
#define MAGIC "MOBSFX01"
#define ID_SIZE 64
#define FIX_UNPACK \
    "Make sure /var/lib/mobility is a local, writable directory owned by root (not writable by others) with 100 MiB " \
    "free, or set MOBILITY_BOOTSTRAP_CACHE to such a directory, then run the bootstrapper again."

struct trailer {
    char magic[8];
    uint64_t offset; /* where the payload starts in this file */
    uint64_t size;   /* its length in bytes */
    char id[ID_SIZE]; /* the cache directory's name, NUL-padded */
};

struct payload {
    int fd;
    uint64_t left; /* compressed bytes not yet read */
    z_stream z;
    unsigned char in[1 << 16];
};

#define UNPACK_FAIL(...) fail(EXIT_ERROR, "BOOTSTRAP-UNPACK-FAILED", FIX_UNPACK, __VA_ARGS__)

static char unpacking[PATH_MAX]; /* this process's .tmp directory while it unpacks: removed if it fails */

/* Exactly n decompressed bytes into out; fails on a short or damaged stream. */
static void payload_read(struct payload *p, void *out, size_t n)
{
    p->z.next_out = out;
    p->z.avail_out = (uInt)n;
    while (p->z.avail_out > 0) {
        if (p->z.avail_in == 0 && p->left > 0) {
            size_t want = p->left < sizeof(p->in) ? (size_t)p->left : sizeof(p->in);
            ssize_t got = read(p->fd, p->in, want);
            if (got <= 0)
                UNPACK_FAIL("cannot read this program's payload: %s", got < 0 ? strerror(errno) : "truncated");
            p->left -= (uint64_t)got;
            p->z.next_in = p->in;
            p->z.avail_in = (uInt)got;
        }
        int rc = inflate(&p->z, Z_NO_FLUSH);
        if (rc == Z_STREAM_END && p->z.avail_out > 0)
            UNPACK_FAIL("this program's payload ends early: the file is damaged; download it again");
        if (rc != Z_OK && rc != Z_STREAM_END)
            UNPACK_FAIL("this program's payload is damaged (zlib: %s); download it again", p->z.msg ? p->z.msg : "?");
    }
}

static uint64_t le(const unsigned char *b, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

/* A payload path must stay inside the directory: relative, no empty, "." or ".." component. */
static int safe_relative(const char *path)
{
    if (!*path || *path == '/')
        return 0;
    for (const char *p = path; *p;) {
        size_t len = strcspn(p, "/");
        if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            return 0;
        p += len + (p[len] == '/');
    }
    return 1;
}

static void write_all(int fd, const unsigned char *buf, size_t n, const char *path)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            UNPACK_FAIL("cannot write %s: %s", path, strerror(errno));
        buf += w;
        n -= (size_t)w;
    }
}

static void unpack(int self_fd, const struct trailer *t, int dirfd, const char *where)
{
    static struct payload p;
    static unsigned char buf[1 << 16];
    p.fd = self_fd;
    p.left = t->size;
    if (lseek(self_fd, (off_t)t->offset, SEEK_SET) < 0)
        UNPACK_FAIL("cannot read this program's payload: %s", strerror(errno));
    if (inflateInit(&p.z) != Z_OK)
        UNPACK_FAIL("zlib cannot start");
    for (;;) {
        unsigned char head[17];
        payload_read(&p, head, sizeof(head));
        char kind = (char)head[0];
        mode_t mode = (mode_t)le(head + 1, 4) & 0755;
        uint64_t path_len = le(head + 5, 4), size = le(head + 9, 8);
        if (kind == 'E')
            break;
        char path[PATH_MAX];
        if (path_len == 0 || path_len >= sizeof(path))
            UNPACK_FAIL("this program's payload is damaged (a path of %llu bytes)", (unsigned long long)path_len);
        payload_read(&p, path, (size_t)path_len);
        path[path_len] = 0;
        if (!safe_relative(path))
            UNPACK_FAIL("this program's payload is damaged (path %s)", path);
        if (kind == 'd') {
            if (size != 0 || mkdirat(dirfd, path, mode) < 0)
                UNPACK_FAIL("cannot create %s/%s: %s", where, path, strerror(errno));
        } else if (kind == 'f') {
            int fd = openat(dirfd, path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
            if (fd < 0)
                UNPACK_FAIL("cannot create %s/%s: %s", where, path, strerror(errno));
            while (size > 0) {
                size_t n = size < sizeof(buf) ? (size_t)size : sizeof(buf);
                payload_read(&p, buf, n);
                write_all(fd, buf, n, path);
                size -= n;
            }
            if (fchmod(fd, mode) < 0 || close(fd) < 0)
                UNPACK_FAIL("cannot write %s/%s: %s", where, path, strerror(errno));
        } else {
            UNPACK_FAIL("this program's payload is damaged (record kind %d)", kind);
        }
    }
    /* Drain to the end of the stream: zlib checks the Adler-32 of everything there. */
    unsigned char rest;
    p.z.next_out = &rest;
    p.z.avail_out = 1;
    for (;;) {
        if (p.z.avail_in == 0 && p.left > 0) {
            size_t want = p.left < sizeof(p.in) ? (size_t)p.left : sizeof(p.in);
            ssize_t got = read(p.fd, p.in, want);
            if (got <= 0)
                UNPACK_FAIL("cannot read this program's payload: truncated");
            p.left -= (uint64_t)got;
            p.z.next_in = p.in;
            p.z.avail_in = (uInt)got;
        }
        int rc = inflate(&p.z, Z_NO_FLUSH);
        if (p.z.avail_out == 0)
            UNPACK_FAIL("this program's payload is damaged (data after its end); download it again");
        if (rc == Z_STREAM_END)
            break;
        if ((rc != Z_OK && rc != Z_BUF_ERROR) || (p.left == 0 && p.z.avail_in == 0))
            UNPACK_FAIL("this program's payload is damaged (zlib: %s); download it again",
                        p.z.msg ? p.z.msg : "truncated");
    }
    if (p.left != 0 || p.z.avail_in != 0)
        UNPACK_FAIL("this program's payload is damaged (bytes after its end); download it again");
    inflateEnd(&p.z);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return flag == FTW_DP ? rmdir(path) : unlink(path);
}

static void remove_tree(const char *path)
{
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void remove_unpacking(void)
{
    if (unpacking[0])
        remove_tree(unpacking);
}

/* Whether a directory is ours alone: a real directory (not a link) owned by this user, writable by nobody else. */
static int private_dir(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid() && !(st.st_mode & 022);
}

/* Remove what killed unpacks left (.ID.PID.tmp of a process that is gone) and, with keep set, other payloads' caches. */
static void clean(const char *base, const char *keep)
{
    DIR *d = opendir(base);
    if (!d)
        return;
    struct dirent *e;
    char path[PATH_MAX];
    while ((e = readdir(d))) {
        const char *n = e->d_name;
        if (!strcmp(n, ".") || !strcmp(n, ".."))
            continue;
        size_t len = strlen(n);
        int stale = 0;
        if (n[0] == '.' && len > 4 && !strcmp(n + len - 4, ".tmp")) {
            const char *dot = strrchr(n, '.'); /* ".tmp" */
            const char *pid_start = dot - 1;
            while (pid_start > n && pid_start[-1] != '.')
                pid_start--;
            long pid = strtol(pid_start, NULL, 10);
            stale = pid > 0 && pid != getpid() && kill((pid_t)pid, 0) < 0 && errno == ESRCH;
        } else if (keep && n[0] != '.' && strcmp(n, keep) != 0) {
            stale = 1;
        }
        if (stale && snprintf(path, sizeof(path), "%s/%s", base, n) < (int)sizeof(path))
            remove_tree(path);
    }
    closedir(d);
}

static void make_dirs(const char *path)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s", path);
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = 0;
            if (mkdir(p, 0755) < 0 && errno != EEXIST)
                UNPACK_FAIL("cannot create %s: %s", p, strerror(errno));
            *s = '/';
        }
    }
    if (mkdir(p, 0700) < 0 && errno != EEXIST)
        UNPACK_FAIL("cannot create %s: %s", p, strerror(errno));
}

static void cache_base(char *out, size_t size)
{
    const char *env = getenv("MOBILITY_BOOTSTRAP_CACHE");
    const char *home = getenv("HOME");
    int n;
    if (env && *env)
        n = snprintf(out, size, "%s", env);
    else if (geteuid() == 0)
        n = snprintf(out, size, "/var/lib/mobility/bootstrap");
    else if (home && *home == '/')
        n = snprintf(out, size, "%s/.cache/mobility/bootstrap", home);
    else
        UNPACK_FAIL("no cache directory: not root, no HOME and no MOBILITY_BOOTSTRAP_CACHE");
    if (n >= (int)size)
        UNPACK_FAIL("cache directory path too long");
}

int main(int argc, char **argv)
{
    char self[PATH_MAX], base[PATH_MAX], final[PATH_MAX], tmp[PATH_MAX];
    struct trailer t;
    check_kernel();
    if (self_path(argc > 0 ? argv[0] : "", self) < 0)
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "cannot tell where this program is (no /proc, no path)");
    int fd = open(self, O_RDONLY | O_CLOEXEC);
    off_t end = fd < 0 ? -1 : lseek(fd, 0, SEEK_END);
    if (end < (off_t)sizeof(t) || pread(fd, &t, sizeof(t), end - (off_t)sizeof(t)) != (ssize_t)sizeof(t)
        || memcmp(t.magic, MAGIC, sizeof(t.magic)) != 0 || t.offset + t.size + sizeof(t) != (uint64_t)end)
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "%s carries no runtime payload (an incomplete download?)",
             self);
    char id[ID_SIZE + 1];
    memcpy(id, t.id, ID_SIZE);
    id[ID_SIZE] = 0;
    if (!safe_relative(id) || strchr(id, '/') || id[0] == '.')
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "%s has a damaged trailer", self);

    cache_base(base, sizeof(base));
    if (snprintf(final, sizeof(final), "%s/%s", base, id) >= (int)sizeof(final)
        || snprintf(tmp, sizeof(tmp), "%s/.%s.%ld.tmp", base, id, (long)getpid()) >= (int)sizeof(tmp))
        UNPACK_FAIL("cache directory path too long");

    struct stat st;
    if (lstat(final, &st) != 0) {
        make_dirs(base);
        if (!private_dir(base))
            UNPACK_FAIL("%s must be a directory owned by uid %d and writable by it alone", base, (int)geteuid());
        clean(base, NULL);
        if (mkdir(tmp, 0755) < 0)
            UNPACK_FAIL("cannot create %s: %s", tmp, strerror(errno));
        snprintf(unpacking, sizeof(unpacking), "%s", tmp);
        atexit(remove_unpacking); /* fail() exits: nothing half-unpacked stays behind (SIGKILL: the next start) */
        int dirfd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dirfd < 0)
            UNPACK_FAIL("cannot open %s: %s", tmp, strerror(errno));
        unpack(fd, &t, dirfd, tmp);
        if (syncfs(dirfd) < 0) /* the files' data on disk before the name says they are complete */
            UNPACK_FAIL("cannot sync %s: %s", tmp, strerror(errno));
        close(dirfd);
        if (rename(tmp, final) < 0) {
            if (errno != EEXIST && errno != ENOTEMPTY)
                UNPACK_FAIL("cannot rename %s to %s: %s", tmp, final, strerror(errno));
            remove_tree(tmp); /* a concurrent first start won: use its copy */
            unpacking[0] = 0;
        } else {
            unpacking[0] = 0;
            int basefd = open(base, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (basefd >= 0) {
                fsync(basefd);
                close(basefd);
            }
            clean(base, id);
        }
    }
    if (!private_dir(base) || !private_dir(final))
        UNPACK_FAIL("%s and %s must be directories owned by uid %d and writable by it alone", base, final,
                    (int)geteuid());
    close(fd);
    exec_runtime(final, PROGRAM, argc, argv);
    return EXIT_ERROR;
}
