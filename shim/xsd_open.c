/*
 * libxenpv_xsd.so: an LD_PRELOAD interposer that lets Xen's C xenstored find dom0's
 * xenstore ring on the loopback emulator.
 *
 * On a Xen host, dom0's kernel publishes its own xenstore ring through two files:
 * /proc/xen/xsd_port (the event-channel port, as text) and /proc/xen/xsd_kva (one page,
 * mapped with mmap).  C xenstored opens both paths, compiled in, at startup.  This
 * library redirects those two open() calls to the files named by $XENPV_XSD_PORT and
 * $XENPV_XSD_KVA (a text file with the port, a one-page file holding the ring); every
 * other open() goes straight to libc.
 *
 * For oxenstored it also gives xc_map_foreign_range its meaning (oxenstored maps a guest's
 * ring by the frame named in XS_INTRODUCE; the replacement libxenctrl has only an ENOSYS
 * stub): one xenforeignmemory_map of the frames, through the replacement
 * libxenforeignmemory the process has loaded.
 *
 * It also ties the server's life to its launcher's: when $XENPV_XSD_LIFELINE names a
 * descriptor (the read end of a pipe whose write end only the launcher holds), a thread
 * started at load time waits on it and kills the process once it reads end of file, which
 * happens when the launcher exits in any way, SIGKILL included.  See shim/README.md.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define XENPV_EXPORT __attribute__((visibility("default")))

XENPV_EXPORT int open(const char *path, int flags, ...);
XENPV_EXPORT int open64(const char *path, int flags, ...);
XENPV_EXPORT void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot,
                                        unsigned long mfn);

typedef int open_fn(const char *, int, ...);

static const char *redirect(const char *path)
{
    static const struct {
        const char *path, *env;
    } table[] = {
        {"/proc/xen/xsd_kva", "XENPV_XSD_KVA"},
        {"/proc/xen/xsd_port", "XENPV_XSD_PORT"},
        /* oxenstored raises RLIMIT_NOFILE to this (EPERM without CAP_SYS_RESOURCE) */
        {"/proc/sys/fs/nr_open", "XENPV_XSD_NR_OPEN"},
    };
    if (!path)
        return path;
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        if (strcmp(path, table[i].path) == 0) {
            const char *to = getenv(table[i].env);
            return to && *to ? to : path;
        }
    return path;
}

static mode_t mode_arg(int flags, va_list ap)
{
    /* open(2): the mode argument exists only with O_CREAT or O_TMPFILE */
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE)
        return va_arg(ap, mode_t);
    return 0;
}

static int call_next(const char *path, int flags, mode_t mode)
{
    open_fn *next = (open_fn *)dlsym(RTLD_NEXT, "open");
    if (!next)
        return -1;
    return next(redirect(path), flags, mode);
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return call_next(path, flags, mode);
}

/* On x86-64, open64 is open (off_t is 64 bits). */
int open64(const char *path, int flags, ...) __attribute__((alias("open")));

static void *watch_lifeline(void *arg)
{
    int fd = (int)(long)arg;
    char byte;
    ssize_t n;
    do
        n = read(fd, &byte, 1);
    while (n > 0 || (n < 0 && errno == EINTR));
    kill(getpid(), SIGKILL); /* the launcher is gone (or the descriptor is unusable) */
    return NULL;
}

__attribute__((constructor)) static void start_lifeline(void)
{
    const char *s = getenv("XENPV_XSD_LIFELINE");
    char *end;
    long fd;
    pthread_t thread;
    pthread_attr_t attr;
    sigset_t all, old;

    if (!s || !*s)
        return;
    fd = strtol(s, &end, 10);
    if (*end || fd < 0 || fcntl((int)fd, F_GETFD) < 0)
        return;
    /* (not close-on-exec: a launcher that execs the server, e.g. through unshare and a
     * shell, passes it on, and the server's own constructor watches it again) */
    /* the watcher takes no signals: the server's handlers run in its own thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 65536);
    if (pthread_create(&thread, &attr, watch_lifeline, (void *)fd) != 0)
        kill(getpid(), SIGKILL); /* without a watcher the server could outlive us */
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* libxenctrl's xc_map_foreign_range: map `size` bytes of dom's frames from `mfn` on. */
void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot, unsigned long mfn)
{
    typedef void *fopen_fn(void *logger, unsigned int flags);
    typedef void *fmap_fn(void *fmem, uint32_t dom, int prot, size_t pages,
                          const unsigned long arr[], int err[]);
    static void *fmem; /* one handle for the process: the server maps from its loop only */
    fopen_fn *fopen_ = (fopen_fn *)dlsym(RTLD_DEFAULT, "xenforeignmemory_open");
    fmap_fn *fmap = (fmap_fn *)dlsym(RTLD_DEFAULT, "xenforeignmemory_map");
    size_t pages, i;
    unsigned long frames[16];
    int err[16];
    void *addr;

    (void)xch;
    if (size <= 0 || (size_t)size > sizeof(frames) / sizeof(frames[0]) * 4096) {
        errno = EINVAL;
        return NULL;
    }
    if (!fopen_ || !fmap) {
        errno = ENOSYS;
        return NULL;
    }
    if (!fmem && !(fmem = fopen_(NULL, 0)))
        return NULL;
    pages = ((size_t)size + 4095) / 4096;
    for (i = 0; i < pages; i++)
        frames[i] = mfn + i;
    addr = fmap(fmem, dom, prot, pages, frames, err);
    if (!addr)
        return NULL;
    for (i = 0; i < pages; i++)
        if (err[i]) {
            munmap(addr, pages * 4096);
            errno = -err[i] > 0 ? -err[i] : EINVAL;
            return NULL;
        }
    return addr;
}
