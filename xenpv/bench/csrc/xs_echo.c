/*
 * xs_echo: the transport floor for the xenstore benchmark.
 *
 * A minimal request/response exchange over a Unix stream socket with xenstore's framing
 * (16-byte header + small payload each way), C on both sides, so the benchmark can say how
 * close a real xenstore round trip comes to the cost of the socket itself.
 *
 *   xs_echo server SOCKET          serve one connection, answer every request
 *   xs_echo client SOCKET COUNT    send COUNT requests one at a time; print "COUNT SECONDS"
 *
 * The server answers a request of any type with the same header fields and a 5-byte
 * payload, like a READ of a short value.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct hdr {
    uint32_t type, req_id, tx_id, len; /* io/xs_wire.h: struct xsd_sockmsg */
};

static int io_all(int fd, void *buf, size_t n, int writing)
{
    char *p = buf;
    while (n) {
        ssize_t r = writing ? write(fd, p, n) : read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int unix_addr(const char *path, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path))
        return -1;
    strcpy(sa->sun_path, path);
    return 0;
}

static int serve(const char *path)
{
    struct sockaddr_un sa;
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    if (ls < 0 || unix_addr(path, &sa) || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) ||
        listen(ls, 1)) {
        perror("xs_echo server");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) {
        perror("accept");
        return 1;
    }
    char buf[4096 + sizeof(struct hdr)];
    for (;;) {
        struct hdr *h = (struct hdr *)buf;
        if (io_all(fd, h, sizeof(*h), 0) || h->len > 4096 || io_all(fd, h + 1, h->len, 0))
            break;
        h->len = 5;
        memcpy(h + 1, "value", 5);
        if (io_all(fd, buf, sizeof(*h) + 5, 1))
            break;
    }
    close(fd);
    close(ls);
    unlink(path);
    return 0;
}

static int client(const char *path, long count)
{
    struct sockaddr_un sa;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || unix_addr(path, &sa) || connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
        perror("xs_echo client");
        return 1;
    }
    static const char key[] = "/bench/key"; /* a READ request: <path>\0 */
    char buf[4096 + sizeof(struct hdr)];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        struct hdr *h = (struct hdr *)buf;
        h->type = 2;
        h->req_id = (uint32_t)i + 1;
        h->tx_id = 0;
        h->len = sizeof(key);
        memcpy(h + 1, key, sizeof(key));
        if (io_all(fd, buf, sizeof(*h) + sizeof(key), 1) || io_all(fd, h, sizeof(*h), 0) ||
            h->len > 4096 || io_all(fd, h + 1, h->len, 0) || h->req_id != (uint32_t)i + 1) {
            fprintf(stderr, "xs_echo client: exchange %ld failed\n", i);
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %.9f\n", count, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "server"))
        return serve(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "client"))
        return client(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: xs_echo server SOCKET | xs_echo client SOCKET COUNT\n");
    return 2;
}
