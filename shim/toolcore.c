/*
 * libxentoolcore.so.1 for the loopback emulator.
 *
 * Xen's tool libraries register every open handle here so that one call,
 * xentoolcore_restrict_all(domid), can restrict all of them to one domain.  This keeps a
 * plain array of the registered handles; restricting calls each handle's callback (the first
 * member of the handle structure, which is all this library may touch: the rest belongs to
 * the library that registered it).
 */
#include "xenpv_xentypes.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

XENPV_EXPORT int xentoolcore_restrict_all(domid_t domid);
XENPV_EXPORT void xentoolcore__register_active_handle(Xentoolcore__Active_Handle *ah);
XENPV_EXPORT void xentoolcore__deregister_active_handle(Xentoolcore__Active_Handle *ah);
XENPV_EXPORT int xentoolcore__restrict_by_dup2_null(int fd);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Xentoolcore__Active_Handle **handles;
static size_t nhandles, caphandles;

void xentoolcore__register_active_handle(Xentoolcore__Active_Handle *ah)
{
    pthread_mutex_lock(&lock);
    if (nhandles == caphandles) {
        size_t cap = caphandles ? caphandles * 2 : 16;
        Xentoolcore__Active_Handle **n = realloc(handles, cap * sizeof(*n));
        if (!n) {
            /* Out of memory: the handle just cannot be restricted later. */
            pthread_mutex_unlock(&lock);
            return;
        }
        handles = n;
        caphandles = cap;
    }
    handles[nhandles++] = ah;
    pthread_mutex_unlock(&lock);
}

void xentoolcore__deregister_active_handle(Xentoolcore__Active_Handle *ah)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nhandles; i++)
        if (handles[i] == ah) {
            handles[i] = handles[--nhandles];
            break;
        }
    pthread_mutex_unlock(&lock);
}

int xentoolcore_restrict_all(domid_t domid)
{
    int rc = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nhandles && rc == 0; i++)
        if (handles[i]->restrict_callback)
            rc = handles[i]->restrict_callback(handles[i], domid);
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Make fd useless (points at /dev/null) while keeping the descriptor number allocated. */
int xentoolcore__restrict_by_dup2_null(int fd)
{
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0)
        return -1;
    int rc = dup2(null, fd);
    int saved = errno;
    close(null);
    errno = saved;
    return rc < 0 ? -1 : 0;
}
