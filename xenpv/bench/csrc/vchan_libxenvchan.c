/*
 * vchan_libxenvchan: Debian's libxenvchan driven from C, the anchor of `xenpv bench vchan`.
 *
 * Theory of operation
 * -------------------
 * "server" publishes a vchan (both rings at least RING bytes) and receives BYTES bytes;
 * "client" connects and sends BYTES bytes in CHUNK-sized libxenvchan_write calls.  Both use
 * non-blocking calls, spin up to SPIN_US microseconds on the ring when nothing moved, and
 * then sleep in poll() on the event fd (acknowledged with libxenvchan_wait).  The server
 * prints "ready" once published and, at the end, "done <bytes> <seconds> <cpu>" where seconds
 * run from the first byte received to the last and cpu is the process CPU time spent in the
 * transfer loop.  The client prints "done <bytes> <cpu>" (its CPU time in the send loop).
 *
 * Usage: vchan_libxenvchan server|client PEER_DOMID XS_PATH BYTES [RING [CHUNK [SPIN_US]]]
 */
#include <libxenvchan.h>

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void wait_event(struct libxenvchan *v, int spin_us, int reading)
{
    double end = now() + spin_us * 1e-6;
    while (now() < end) {
        if (reading ? libxenvchan_data_ready(v) > 0 : libxenvchan_buffer_space(v) > 0)
            return;
        if (!libxenvchan_is_open(v))
            return;
    }
    struct pollfd pfd = { .fd = libxenvchan_fd_for_select(v), .events = POLLIN };
    if (poll(&pfd, 1, 200) > 0)
        libxenvchan_wait(v);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s server|client PEER_DOMID XS_PATH BYTES [RING [CHUNK [SPIN_US]]]\n", argv[0]);
        return 1;
    }
    int server = strcmp(argv[1], "server") == 0;
    int peer = atoi(argv[2]);
    const char *path = argv[3];
    unsigned long long total = strtoull(argv[4], NULL, 0);
    size_t ring = argc > 5 ? strtoul(argv[5], NULL, 0) : 1 << 20;
    size_t chunk = argc > 6 ? strtoul(argv[6], NULL, 0) : 1 << 16;
    int spin_us = argc > 7 ? atoi(argv[7]) : 50;
    char *buf = calloc(1, chunk);
    if (!buf)
        return 1;
    memset(buf, 0x5A, chunk);

    struct libxenvchan *v = server ? libxenvchan_server_init(NULL, peer, path, ring, ring)
                                   : libxenvchan_client_init(NULL, peer, path);
    if (!v) {
        perror(server ? "libxenvchan_server_init" : "libxenvchan_client_init");
        return 1;
    }
    v->blocking = 0;
    unsigned long long done = 0;
    double cpu = cpu_now();
    if (server) {
        printf("ready\n");
        fflush(stdout);
        double first = 0, last = 0;
        while (done < total) {
            unsigned long long left = total - done;
            int n = libxenvchan_read(v, buf, left < chunk ? (size_t)left : chunk);
            if (n < 0)
                break;
            if (n == 0) {
                wait_event(v, spin_us, 1);
                continue;
            }
            last = now();
            if (!done)
                first = last;
            done += n;
        }
        printf("done %llu %.9f %.6f\n", done, last - first, cpu_now() - cpu);
    } else {
        while (done < total) {
            unsigned long long left = total - done;
            int n = libxenvchan_write(v, buf, left < chunk ? (size_t)left : chunk);
            if (n < 0)
                break;
            if (n == 0) {
                wait_event(v, spin_us, 0);
                continue;
            }
            done += n;
        }
        cpu = cpu_now() - cpu;
        /* stay until the server has read everything and closed */
        while (libxenvchan_is_open(v))
            wait_event(v, 0, 1);
        printf("done %llu %.6f\n", done, cpu);
    }
    fflush(stdout);
    libxenvchan_close(v);
    free(buf);
    return done == total ? 0 : 2;
}
