/*
 * xs_libxs_read: sequential reads through Xen's own libxenstore (a C loop).
 *
 *   xs_libxs_read PATH COUNT     xs_open(0) (honours $XENSTORED_PATH), then COUNT calls of
 *                                xs_read(PATH); prints "COUNT SECONDS"
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <xenstore.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: xs_libxs_read PATH COUNT\n");
        return 2;
    }
    long count = atol(argv[2]);
    struct xs_handle *h = xs_open(0);
    if (!h) {
        perror("xs_open");
        return 1;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        unsigned int len;
        void *v = xs_read(h, XBT_NULL, argv[1], &len);
        if (!v) {
            perror("xs_read");
            return 1;
        }
        free(v);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %.9f\n", count, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    xs_close(h);
    return 0;
}
