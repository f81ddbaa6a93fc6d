/*
 * vchan_peer_server: a vchan server built on Debian's libxenvchan, as a peer for xenpv's
 * vchan client tests.
 *
 * Theory of operation
 * -------------------
 * The program publishes a vchan with libxenvchan_server_init (both rings at least RING
 * bytes), prints "ready" and waits for a client.  It then sends SEND bytes and receives
 * RECV bytes at the same time in non-blocking mode: each pass writes what fits and reads
 * what is there; when neither moved, it sleeps in poll() on the library's event fd and
 * acknowledges the event with libxenvchan_wait().  The bytes sent come from a xorshift
 * generator.  At the end it prints one line
 *
 *     done <sent> <sent-crc32> <received> <received-crc32>
 *
 * (CRC-32 as zlib computes it), or "closed <sent> <received>" if the client went away
 * first.  With HOLD non-zero it then waits until the client is gone and prints
 * "peer-closed".  Exit status: 0 done, 1 usage/setup error, 2 transfer error or early close.
 *
 * Usage: vchan_peer_server CLIENT_DOMID XS_PATH SEND RECV [RING [HOLD]]
 */
#include <libxenvchan.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK (64 * 1024)

static uint32_t crc_tab[256];

static void crc_setup(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t v = i;
        for (int b = 0; b < 8; b++)
            v = (v >> 1) ^ ((v & 1) ? 0xEDB88320u : 0);
        crc_tab[i] = v;
    }
}

static uint32_t crc_add(uint32_t crc, const unsigned char *p, size_t len)
{
    crc ^= 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++)
        crc = crc_tab[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static void rng_fill(unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        p[i] = (unsigned char)(rng_state >> 24);
    }
}

static void sleep_on_event(struct libxenvchan *v)
{
    struct pollfd pfd = { .fd = libxenvchan_fd_for_select(v), .events = POLLIN };
    if (poll(&pfd, 1, 500) > 0)
        libxenvchan_wait(v);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s CLIENT_DOMID XS_PATH SEND RECV [RING [HOLD]]\n", argv[0]);
        return 1;
    }
    int domid = atoi(argv[1]);
    const char *path = argv[2];
    unsigned long long send_total = strtoull(argv[3], NULL, 0);
    unsigned long long recv_total = strtoull(argv[4], NULL, 0);
    size_t ring = argc > 5 ? strtoul(argv[5], NULL, 0) : 0;
    int hold = argc > 6 ? atoi(argv[6]) : 0;

    crc_setup();
    struct libxenvchan *v = libxenvchan_server_init(NULL, domid, path, ring, ring);
    if (!v) {
        perror("libxenvchan_server_init");
        return 1;
    }
    v->blocking = 0;
    printf("ready\n");
    fflush(stdout);

    while (libxenvchan_is_open(v) == 2)
        sleep_on_event(v);

    static unsigned char out[CHUNK], in[CHUNK];
    size_t out_len = 0, out_pos = 0;
    unsigned long long sent = 0, received = 0;
    uint32_t sent_crc = 0, recv_crc = 0;
    int status = 0;

    while (sent < send_total || received < recv_total) {
        int progress = 0;
        if (sent < send_total) {
            if (out_pos == out_len) {
                unsigned long long left = send_total - sent;
                out_len = left < CHUNK ? (size_t)left : CHUNK;
                out_pos = 0;
                rng_fill(out, out_len);
            }
            int n = libxenvchan_write(v, out + out_pos, out_len - out_pos);
            if (n < 0) {
                status = 2;
                break;
            }
            if (n > 0) {
                sent_crc = crc_add(sent_crc, out + out_pos, n);
                out_pos += n;
                sent += n;
                progress = 1;
            }
        }
        if (received < recv_total) {
            unsigned long long left = recv_total - received;
            size_t want = left < CHUNK ? (size_t)left : CHUNK;
            int n = libxenvchan_read(v, in, want);
            if (n < 0) {
                status = 2;
                break;
            }
            if (n > 0) {
                recv_crc = crc_add(recv_crc, in, n);
                received += n;
                progress = 1;
            }
        }
        if (!progress) {
            if (!libxenvchan_is_open(v)) {
                status = 2;
                break;
            }
            sleep_on_event(v);
        }
    }
    if (status == 0)
        printf("done %llu %u %llu %u\n", sent, sent_crc, received, recv_crc);
    else
        printf("closed %llu %llu\n", sent, received);
    fflush(stdout);
    if (status == 0 && hold) {
        while (libxenvchan_is_open(v))
            sleep_on_event(v);
        printf("peer-closed\n");
        fflush(stdout);
    }
    libxenvchan_close(v);
    return status;
}
