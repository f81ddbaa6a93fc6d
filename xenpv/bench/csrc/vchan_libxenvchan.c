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
 * The server reads up to READ bytes per call (default: CHUNK).
 *
 * Round trips: "echo" publishes a vchan (RING 0: the rings inside the shared page) and
 * sends back everything it receives until the peer closes, then prints "done <bytes>";
 * "ping" connects and times COUNT round trips of CHUNK-byte messages (write the message,
 * read it back whole), then prints "done <count> <median_us> <mean_us>".  Both use the
 * same spin-then-sleep wait as the transfers.
 *
 * Usage: vchan_libxenvchan server|client PEER_DOMID XS_PATH BYTES [RING [CHUNK [SPIN_US [READ]]]]
 *        vchan_libxenvchan echo|ping PEER_DOMID XS_PATH COUNT [RING [CHUNK [SPIN_US]]]
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

/* Move exactly n bytes (write or read), waiting as the transfers do; -1 on a closed vchan. */
static int move_all(struct libxenvchan *v, char *buf, size_t n, int spin_us, int reading)
{
    size_t done = 0;
    while (done < n) {
        int r = reading ? libxenvchan_read(v, buf + done, n - done)
                        : libxenvchan_write(v, buf + done, n - done);
        if (r < 0)
            return -1;
        if (r == 0) {
            if (!libxenvchan_is_open(v))
                return -1;
            wait_event(v, spin_us, reading);
            continue;
        }
        done += r;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int echo(struct libxenvchan *v, char *buf, size_t chunk, int spin_us)
{
    unsigned long long total = 0;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = libxenvchan_read(v, buf, chunk);
        if (n < 0)
            break;
        if (n == 0) {
            if (!libxenvchan_is_open(v))
                break;
            wait_event(v, spin_us, 1);
            continue;
        }
        if (move_all(v, buf, n, spin_us, 0) < 0)
            break;
        total += n;
    }
    printf("done %llu\n", total);
    return 0;
}

static int ping(struct libxenvchan *v, char *buf, size_t size, unsigned long long count,
                int spin_us)
{
    char *back = malloc(size);
    double *times = malloc(count * sizeof(double));
    double sum = 0;
    if (!back || !times || !count)
        return 1;
    for (unsigned long long i = 0; i < count; i++) {
        double t0 = now();
        if (move_all(v, buf, size, spin_us, 0) < 0 || move_all(v, back, size, spin_us, 1) < 0)
            return 2;
        times[i] = now() - t0;
        sum += times[i];
        if (memcmp(buf, back, size) != 0) {
            fprintf(stderr, "ping: message came back changed\n");
            return 2;
        }
    }
    qsort(times, count, sizeof(double), cmp_double);
    printf("done %llu %.3f %.3f\n", count, times[count / 2] * 1e6, sum / count * 1e6);
    free(times);
    free(back);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s server|client|echo|ping PEER_DOMID XS_PATH BYTES|COUNT "
                "[RING [CHUNK [SPIN_US [READ]]]]\n", argv[0]);
        return 1;
    }
    int rtt = strcmp(argv[1], "echo") == 0 || strcmp(argv[1], "ping") == 0;
    int server = strcmp(argv[1], "server") == 0 || strcmp(argv[1], "echo") == 0;
    int peer = atoi(argv[2]);
    const char *path = argv[3];
    unsigned long long total = strtoull(argv[4], NULL, 0);
    size_t ring = argc > 5 ? strtoul(argv[5], NULL, 0) : 1 << 20;
    size_t chunk = argc > 6 ? strtoul(argv[6], NULL, 0) : 1 << 16;
    int spin_us = argc > 7 ? atoi(argv[7]) : 50;
    size_t readsz = argc > 8 ? strtoul(argv[8], NULL, 0) : chunk;
    size_t bufsz = readsz > chunk ? readsz : chunk;
    if (rtt && bufsz < (1 << 16))
        bufsz = 1 << 16;
    char *buf = calloc(1, bufsz);
    if (!buf)
        return 1;
    memset(buf, 0x5A, bufsz);

    struct libxenvchan *v = server ? libxenvchan_server_init(NULL, peer, path, ring, ring)
                                   : libxenvchan_client_init(NULL, peer, path);
    if (!v) {
        perror(server ? "libxenvchan_server_init" : "libxenvchan_client_init");
        return 1;
    }
    v->blocking = 0;
    if (rtt) {
        int status = server ? echo(v, buf, bufsz, spin_us) : ping(v, buf, chunk, total, spin_us);
        fflush(stdout);
        libxenvchan_close(v);
        free(buf);
        return status;
    }
    unsigned long long done = 0;
    double cpu = cpu_now();
    if (server) {
        printf("ready\n");
        fflush(stdout);
        double first = 0, last = 0;
        while (done < total) {
            unsigned long long left = total - done;
            int n = libxenvchan_read(v, buf, left < readsz ? (size_t)left : readsz);
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
