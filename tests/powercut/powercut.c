/*
 * A simulated power cut, as an LD_PRELOAD shim: the disk keeps only what was fsynced.
 *
 * For every file opened under $POWERCUT_DIR (except SQLite's -shm, which is shared memory that
 * SQLite rebuilds from the WAL after a crash), the shim keeps a "durable" copy of it in
 * $POWERCUT_SHADOW/<basename>. Writes and truncations go to the real file as usual (the process
 * reads its own writes) and are also remembered in memory, per file; fsync or fdatasync of any
 * descriptor of the file applies what was remembered, in order, to the durable copy. A file is
 * durable from its creation (as if its directory entry were synced at once: SQLite's files are
 * created before anything in them counts), and an unlink removes it at once.
 *
 * After the process is killed with SIGKILL, the durable copies are the disk as a power cut
 * would have left it if the drive had written nothing it was not told to flush: every write
 * since each file's last fsync is gone. (A drive that writes some of them, in any order, is a
 * weaker adversary for SQLite's WAL, whose frames carry checksums; this shim does not model
 * it.) The test then puts the durable copies in place of the real files (`powercut_apply` in
 * tests/src/lib.rs) and restarts the gateway without the shim.
 *
 * Build: cc -shared -fPIC -O2 -o libpowercut.so powercut.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_FILES 256

struct op {
    off_t off;
    size_t len;   /* (size_t)-1: truncate to off */
    char *data;
};

struct file {
    int used;
    char shadow[PATH_MAX];
    struct op *ops;
    size_t n, cap;
};

static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static struct file files[MAX_FILES];
static short fd_file[MAX_FDS]; /* index + 1 into files, 0 = not tracked */
static char dir[PATH_MAX], shadow_dir[PATH_MAX];
static int configured = -1;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_unlink)(const char *);
static off_t (*real_lseek)(int, off_t, int);

static void init(void) {
    if (configured >= 0)
        return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_lseek = dlsym(RTLD_NEXT, "lseek");
    const char *d = getenv("POWERCUT_DIR"), *s = getenv("POWERCUT_SHADOW");
    if (d && s && strlen(d) < sizeof dir && strlen(s) < sizeof shadow_dir) {
        strcpy(dir, d);
        strcpy(shadow_dir, s);
        configured = 1;
    } else {
        configured = 0;
    }
}

static void die(const char *what) {
    fprintf(stderr, "powercut: %s: %s\n", what, strerror(errno));
    abort();
}

/* The durable copy's path for a tracked path, or NULL. */
static const char *shadow_of(const char *path, char *out) {
    size_t n = strlen(dir);
    if (configured != 1 || !path || path[0] != '/' || strncmp(path, dir, n) != 0
        || path[n] != '/')
        return NULL;
    size_t len = strlen(path);
    if (len >= 4 && strcmp(path + len - 4, "-shm") == 0)
        return NULL;
    const char *base = strrchr(path, '/') + 1;
    if (snprintf(out, PATH_MAX, "%s/%s", shadow_dir, base) >= PATH_MAX)
        return NULL;
    return out;
}

static int file_for(const char *shadow) {
    for (int i = 0; i < MAX_FILES; i++)
        if (files[i].used && strcmp(files[i].shadow, shadow) == 0)
            return i;
    for (int i = 0; i < MAX_FILES; i++)
        if (!files[i].used) {
            files[i].used = 1;
            strcpy(files[i].shadow, shadow);
            files[i].n = 0;
            return i;
        }
    errno = EMFILE;
    die("too many tracked files");
    return -1;
}

static void remember(int f, off_t off, const void *data, size_t len) {
    struct file *fl = &files[f];
    if (fl->n == fl->cap) {
        fl->cap = fl->cap ? fl->cap * 2 : 64;
        fl->ops = realloc(fl->ops, fl->cap * sizeof *fl->ops);
        if (!fl->ops)
            die("realloc");
    }
    char *copy = NULL;
    if (len != (size_t)-1) {
        copy = malloc(len ? len : 1);
        if (!copy)
            die("malloc");
        memcpy(copy, data, len);
    }
    fl->ops[fl->n++] = (struct op){off, len, copy};
}

/* Copies the real file to its durable copy if it has none yet: what existed before counts. */
static void seed(const char *path, const char *shadow) {
    struct stat st;
    if (stat(shadow, &st) == 0)
        return;
    int out = real_open(shadow, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0)
        die(shadow);
    int in = real_open(path, O_RDONLY | O_CLOEXEC);
    if (in >= 0) {
        char buf[65536];
        ssize_t r;
        while ((r = read(in, buf, sizeof buf)) > 0)
            if (real_write(out, buf, r) != r)
                die("seed write");
        real_close(in);
    }
    real_close(out);
}

static int opened(int fd, const char *path, int flags) {
    char shadow[PATH_MAX];
    if (fd < 0 || fd >= MAX_FDS || (flags & O_DIRECTORY) || !shadow_of(path, shadow))
        return fd;
    pthread_mutex_lock(&lock);
    seed(path, shadow);
    int f = file_for(shadow);
    if (flags & O_TRUNC)
        remember(f, 0, NULL, (size_t)-1);
    fd_file[fd] = (short)(f + 1);
    pthread_mutex_unlock(&lock);
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_open(path, flags, mode), path, flags);
}

int open64(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_open64(path, flags, mode), path, flags);
}

int openat(int dirfd, const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_openat(dirfd, path, flags, mode);
    return path[0] == '/' ? opened(fd, path, flags) : fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_openat64(dirfd, path, flags, mode);
    return path[0] == '/' ? opened(fd, path, flags) : fd;
}

int close(int fd) {
    init();
    if (fd >= 0 && fd < MAX_FDS && fd_file[fd]) {
        pthread_mutex_lock(&lock);
        fd_file[fd] = 0;
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}

static int tracked(int fd) {
    return fd >= 0 && fd < MAX_FDS ? fd_file[fd] - 1 : -1;
}

/* A positioned write through `real`, remembered if the file is tracked. */
static ssize_t positioned(ssize_t (*real)(int, const void *, size_t, off_t), int fd,
                          const void *buf, size_t len, off_t off) {
    int f = tracked(fd);
    if (f < 0)
        return real(fd, buf, len, off);
    pthread_mutex_lock(&lock);
    ssize_t r = real(fd, buf, len, off);
    if (r > 0)
        remember(f, off, buf, (size_t)r);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    init();
    return positioned(real_pwrite, fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
    init();
    return positioned(real_pwrite64, fd, buf, len, off);
}

ssize_t write(int fd, const void *buf, size_t len) {
    init();
    int f = tracked(fd);
    if (f < 0)
        return real_write(fd, buf, len);
    pthread_mutex_lock(&lock);
    off_t off = real_lseek(fd, 0, SEEK_CUR);
    ssize_t r = real_write(fd, buf, len);
    if (r > 0) {
        if (off < 0)
            die("lseek on a tracked file");
        remember(f, off, buf, (size_t)r);
    }
    pthread_mutex_unlock(&lock);
    return r;
}

/* A truncation through `real`, remembered if the file is tracked. */
static int truncated(int (*real)(int, off_t), int fd, off_t len) {
    int f = tracked(fd);
    int r = real(fd, len);
    if (f >= 0 && r == 0) {
        pthread_mutex_lock(&lock);
        remember(f, len, NULL, (size_t)-1);
        pthread_mutex_unlock(&lock);
    }
    return r;
}

int ftruncate(int fd, off_t len) {
    init();
    return truncated(real_ftruncate, fd, len);
}

int ftruncate64(int fd, off_t len) {
    init();
    return truncated(real_ftruncate64, fd, len);
}

/* Applies a file's remembered writes to its durable copy. */
static void flush(int f) {
    struct file *fl = &files[f];
    if (fl->n == 0)
        return;
    int out = real_open(fl->shadow, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (out < 0)
        die(fl->shadow);
    for (size_t i = 0; i < fl->n; i++) {
        struct op *o = &fl->ops[i];
        if (o->len == (size_t)-1) {
            if (real_ftruncate(out, o->off) != 0)
                die("truncate durable copy");
        } else {
            if (real_pwrite(out, o->data, o->len, o->off) != (ssize_t)o->len)
                die("write durable copy");
            free(o->data);
        }
    }
    fl->n = 0;
    real_close(out);
}

/* A sync through `real`: on success the file's remembered writes become durable. */
static int synced(int (*real)(int), int fd) {
    int r = real(fd);
    int f = tracked(fd);
    if (f >= 0 && r == 0) {
        pthread_mutex_lock(&lock);
        flush(f);
        pthread_mutex_unlock(&lock);
    }
    return r;
}

int fsync(int fd) {
    init();
    return synced(real_fsync, fd);
}

int fdatasync(int fd) {
    init();
    return synced(real_fdatasync, fd);
}

int unlink(const char *path) {
    init();
    int r = real_unlink(path);
    char shadow[PATH_MAX];
    if (r == 0 && shadow_of(path, shadow)) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < MAX_FILES; i++)
            if (files[i].used && strcmp(files[i].shadow, shadow) == 0) {
                for (size_t k = 0; k < files[i].n; k++)
                    free(files[i].ops[k].data);
                files[i].n = 0;
            }
        real_unlink(shadow);
        pthread_mutex_unlock(&lock);
    }
    return r;
}
