/*
 * vchan_bulk: move a large, reproducible byte stream through libxenvchan, both ways.
 *
 * Theory of operation
 * -------------------
 * One process runs as the vchan server (it grants the rings), another as the client.
 * Phase 1: the client sends BYTES bytes to the server.  Phase 2: the server sends BYTES
 * bytes back.  The stream content is a function of (seed, byte offset) only: 32-bit
 * little-endian words w[i] = (i * 2654435761 + seed) mod 2^32, so the test harness can
 * compute the expected digest independently.  Each side prints one line per direction:
 *
 *     sent <count> <crc32-hex>
 *     received <count> <crc32-hex>
 *
 * where the CRC is the usual reflected CRC-32 (polynomial 0xEDB88320, as zlib's crc32).
 * Chunks are written with sizes that do not divide the ring size so the ring indexes wrap
 * at odd offsets.
 *
 * Mode "hold": after connecting, wait until the peer goes away (libxenvchan_is_open()
 * becomes 0) and print "peer-closed"; used to check unmap notifications when the peer is
 * killed.
 *
 * Usage: vchan_bulk server|client|hold-server|hold-client PEER_DOMID XS_PATH [BYTES [RING]]
 * Exit status: 0 on success, 1 on a usage or setup error, 2 on a transfer error.
 */
#include <libxenvchan.h>

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK_MAX (200 * 1024 + 13)

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
        crc_table[n] = c;
    }
}

static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Fill buf with the stream bytes at [off, off + n). */
static void stream_fill(unsigned char *buf, uint64_t off, size_t n, uint32_t seed)
{
    for (size_t k = 0; k < n; k++) {
        uint64_t pos = off + k;
        uint32_t w = (uint32_t)((pos >> 2) * 2654435761u + seed);
        buf[k] = (unsigned char)(w >> (8 * (pos & 3)));
    }
}

static int do_send(struct libxenvchan *v, uint64_t total, uint32_t seed)
{
    static unsigned char buf[CHUNK_MAX];
    uint64_t off = 0;
    uint32_t crc = 0;
    size_t chunk = 4096 + 7;
    while (off < total) {
        size_t n = chunk;
        if (n > total - off)
            n = (size_t)(total - off);
        stream_fill(buf, off, n, seed);
        crc = crc_update(crc, buf, n);
        size_t done = 0;
        while (done < n) {
            int r = libxenvchan_write(v, buf + done, n - done);
            if (r < 0) {
                fprintf(stderr, "vchan_bulk: write failed at %" PRIu64 ": %s\n",
                        off + done, strerror(errno));
                return -1;
            }
            if (r == 0) {
                if (!libxenvchan_is_open(v)) {
                    fprintf(stderr, "vchan_bulk: peer closed while sending\n");
                    return -1;
                }
                if (libxenvchan_wait(v) < 0)
                    return -1;
                continue;
            }
            done += (size_t)r;
        }
        off += n;
        chunk = chunk * 3 + 1;
        if (chunk > CHUNK_MAX)
            chunk = 1000 + (chunk % 4093);
    }
    printf("sent %" PRIu64 " %08" PRIx32 "\n", total, crc);
    fflush(stdout);
    return 0;
}

static int do_receive(struct libxenvchan *v, uint64_t total, uint32_t seed)
{
    static unsigned char buf[CHUNK_MAX], want[CHUNK_MAX];
    uint64_t off = 0;
    uint32_t crc = 0;
    while (off < total) {
        size_t n = CHUNK_MAX;
        if (n > total - off)
            n = (size_t)(total - off);
        int r = libxenvchan_read(v, buf, n);
        if (r < 0) {
            fprintf(stderr, "vchan_bulk: read failed at %" PRIu64 ": %s\n", off,
                    strerror(errno));
            return -1;
        }
        if (r == 0) {
            if (!libxenvchan_is_open(v) && libxenvchan_data_ready(v) == 0) {
                fprintf(stderr, "vchan_bulk: peer closed after %" PRIu64 " bytes\n", off);
                return -1;
            }
            if (libxenvchan_wait(v) < 0)
                return -1;
            continue;
        }
        stream_fill(want, off, (size_t)r, seed);
        if (memcmp(buf, want, (size_t)r) != 0) {
            fprintf(stderr, "vchan_bulk: data mismatch near offset %" PRIu64 "\n", off);
            return -1;
        }
        crc = crc_update(crc, buf, (size_t)r);
        off += (uint64_t)r;
    }
    printf("received %" PRIu64 " %08" PRIx32 "\n", total, crc);
    fflush(stdout);
    return 0;
}

/* Wait until the peer is gone; drain anything it still sent. */
static int do_hold(struct libxenvchan *v)
{
    unsigned char buf[4096];
    printf("connected\n");
    fflush(stdout);
    for (;;) {
        while (libxenvchan_data_ready(v) > 0)
            if (libxenvchan_read(v, buf, sizeof(buf)) < 0)
                return -1;
        if (!libxenvchan_is_open(v)) {
            printf("peer-closed\n");
            fflush(stdout);
            return 0;
        }
        if (libxenvchan_wait(v) < 0)
            return -1;
    }
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s server|client|hold-server|hold-client PEER_DOMID XS_PATH "
                "[BYTES [RING]]\n", argv[0]);
        return 1;
    }
    const char *mode = argv[1];
    int peer = atoi(argv[2]);
    const char *path = argv[3];
    uint64_t total = argc > 4 ? strtoull(argv[4], NULL, 0) : (64u << 20);
    size_t ring = argc > 5 ? (size_t)strtoull(argv[5], NULL, 0) : (1u << 20);
    int server = strcmp(mode, "server") == 0 || strcmp(mode, "hold-server") == 0;
    int hold = strncmp(mode, "hold-", 5) == 0;

    crc_init();
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct libxenvchan *v = server
        ? libxenvchan_server_init(NULL, peer, path, ring, ring)
        : libxenvchan_client_init(NULL, peer, path);
    if (!v) {
        fprintf(stderr, "vchan_bulk: %s init failed: %s\n", mode, strerror(errno));
        return 1;
    }
    v->blocking = 0;
    int rc = 0;
    if (server) {
        /* Wait for the client to connect (cli_live goes from 2 to 1). */
        while (libxenvchan_is_open(v) == 2)
            if (libxenvchan_wait(v) < 0) {
                rc = 2;
                break;
            }
    }
    if (rc == 0 && hold) {
        rc = do_hold(v) ? 2 : 0;
    } else if (rc == 0) {
        /* Phase 1: client -> server (seed 1); phase 2: server -> client (seed 2). */
        if (server)
            rc = (do_receive(v, total, 1) || do_send(v, total, 2)) ? 2 : 0;
        else
            rc = (do_send(v, total, 1) || do_receive(v, total, 2)) ? 2 : 0;
        /* The client waits for the server's goodbye so no data is lost in flight. */
        if (rc == 0 && !server)
            while (libxenvchan_is_open(v) && libxenvchan_wait(v) >= 0)
                ;
    }
    libxenvchan_close(v);
    return rc;
}
