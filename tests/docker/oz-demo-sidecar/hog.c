/* hog N: allocates N MiB and writes to every page, so the memory is really charged to the
 * container's cgroup (an untouched malloc costs nothing). Used to provoke the kernel's OOM
 * killer under a container memory limit. Built with `gcc -static` so it runs in images
 * without a libc. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: hog MIB\n");
        return 64;
    }
    char *end;
    long mib = strtol(argv[1], &end, 10);
    if (*end != '\0' || mib < 0) {
        fprintf(stderr, "hog: not a size in MiB: %s\n", argv[1]);
        return 64;
    }
    const size_t chunk = 1024 * 1024;
    long page = sysconf(_SC_PAGESIZE);
    for (long i = 0; i < mib; i++) {
        /* Chunks are never freed: the point is to keep them resident. */
        char *block = malloc(chunk);
        if (block == NULL) {
            fprintf(stderr, "hog: malloc failed after %ld MiB\n", i);
            return 1;
        }
        for (size_t offset = 0; offset < chunk; offset += (size_t)page) {
            block[offset] = 1;
        }
        if ((i + 1) % 256 == 0) {
            printf("hog: %ld MiB touched\n", i + 1);
            fflush(stdout);
        }
    }
    printf("hog: allocated %ld MiB\n", mib);
    return 0;
}
