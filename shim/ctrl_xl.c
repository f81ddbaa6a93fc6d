/*
 * libxenctrl.so.4.17 for the loopback emulator: the error-reporting and file helpers that
 * xl, libxenlight and libxenguest call on their ordinary paths (not only when building a
 * domain), with their real behaviour.  The calls none of them needs here are the
 * generated ENOSYS stubs of ctrl_stubs.c.
 */
#include "xenpv_xentypes.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

enum xc_error_code { XC_ERROR_NONE = 0, XC_INTERNAL_ERROR, XC_INVALID_KERNEL,
                     XC_INVALID_PARAM, XC_OUT_OF_MEMORY };

#define XC_MAX_ERROR_MSG_LEN 1024
typedef struct xc_error {
    enum xc_error_code code;
    char message[XC_MAX_ERROR_MSG_LEN];
} xc_error;

XENPV_EXPORT const char *xc_strerror(xc_interface *xch, int errcode);
XENPV_EXPORT const char *xc_error_code_to_desc(int code);
XENPV_EXPORT const xc_error *xc_get_last_error(xc_interface *xch);
XENPV_EXPORT int read_exact(int fd, void *data, size_t size);
XENPV_EXPORT int write_exact(int fd, const void *data, size_t size);
XENPV_EXPORT int writev_exact(int fd, const struct iovec *iov, int iovcnt);
XENPV_EXPORT void discard_file_cache(xc_interface *xch, int fd, int flush);

const char *xc_strerror(xc_interface *xch, int errcode)
{
    return strerror(errcode);
}

const char *xc_error_code_to_desc(int code)
{
    switch (code) {
    case XC_ERROR_NONE: return "No error details";
    case XC_INTERNAL_ERROR: return "Internal error";
    case XC_INVALID_KERNEL: return "Invalid kernel";
    case XC_INVALID_PARAM: return "Invalid configuration";
    case XC_OUT_OF_MEMORY: return "Out of memory";
    }
    return "Unknown error code";
}

/* Nothing here records an XC_REPORT_ERROR: the last error is always "none". */
const xc_error *xc_get_last_error(xc_interface *xch)
{
    static const xc_error none = { XC_ERROR_NONE, "" };
    return &none;
}

/* 0 once all of `size` bytes are read, -1 with errno on failure (0 at end of file). */
int read_exact(int fd, void *data, size_t size)
{
    size_t done = 0;
    while (done < size) {
        ssize_t n = read(fd, (char *)data + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = 0;
        if (n <= 0)
            return -1;
        done += n;
    }
    return 0;
}

int write_exact(int fd, const void *data, size_t size)
{
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, (const char *)data + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        done += n;
    }
    return 0;
}

int writev_exact(int fd, const struct iovec *iov, int iovcnt)
{
    for (int i = 0; i < iovcnt; i++)
        if (write_exact(fd, iov[i].iov_base, iov[i].iov_len))
            return -1;
    return 0;
}

/* Drop the file's pages from the page cache (written back first if `flush`). */
void discard_file_cache(xc_interface *xch, int fd, int flush)
{
    int saved = errno;
    if (flush)
        fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    errno = saved;
}
