/* kvm_vmm.bench_disk's reader, run in the guest (built -static) and on the host alike.
 *
 *   diskio seq  PATH LABEL BLOCK_BYTES PAUSE_MS [buffered]
 *   diskio rand PATH LABEL COUNT SEED PAUSE_MS [buffered]
 *
 * seq reads PATH from start to end in BLOCK_BYTES requests; rand does COUNT 4 KiB
 * preads at 4 KiB-aligned offsets drawn from splitmix64(SEED). Both use O_DIRECT
 * unless "buffered" is given. Only the reads are timed (CLOCK_MONOTONIC). The
 * checksum folds the first 8 bytes of every 4 KiB read, in order: the guest's and
 * the host's agree when they read the same bytes. PAUSE_MS of sleep before and after
 * the reads lets the host sample its counters while the guest is idle (it prints
 * READY before the first pause and RESULT before the second).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t fold(uint64_t sum, const unsigned char *data, size_t length) {
    for (size_t at = 0; at + 8 <= length; at += PAGE) {
        uint64_t word;
        memcpy(&word, data + at, 8);
        sum = (sum ^ word) * 0x100000001B3ULL;
    }
    return sum;
}

static int fail(const char *what, const char *label) {
    printf("DISKBENCH ERROR %s %s: %s\n", label, what, strerror(errno));
    fflush(stdout);
    return 1;
}

int main(int argc, char **argv) {
    int seq = argc >= 6 && strcmp(argv[1], "seq") == 0;
    int rnd = argc >= 7 && strcmp(argv[1], "rand") == 0;
    if (!seq && !rnd) {
        fprintf(stderr, "usage: diskio seq PATH LABEL BLOCK_BYTES PAUSE_MS [buffered]\n"
                        "       diskio rand PATH LABEL COUNT SEED PAUSE_MS [buffered]\n");
        return 2;
    }
    const char *path = argv[2], *label = argv[3];
    int last = seq ? 6 : 7;
    int buffered = argc > last && strcmp(argv[last], "buffered") == 0;
    long pause = atol(argv[last - 1]);
    int fd = open(path, O_RDONLY | (buffered ? 0 : O_DIRECT));
    if (fd < 0)
        return fail("open", label);
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < PAGE)
        return fail("size", label);
    size_t block = seq ? (size_t)atol(argv[4]) : PAGE;
    if (block < PAGE || block % PAGE != 0) {
        fprintf(stderr, "BLOCK_BYTES must be a multiple of %d\n", PAGE);
        return 2;
    }
    unsigned char *buffer;
    if (posix_memalign((void **)&buffer, PAGE, block) != 0)
        return fail("posix_memalign", label);
    uint64_t sum = 0xCBF29CE484222325ULL, bytes = 0, reads = 0;
    printf("DISKBENCH READY %s %s\n", label, argv[1]);
    fflush(stdout);
    pause_ms(pause);
    double start = now();
    if (seq) {
        for (off_t at = 0; at < end;) {
            ssize_t got = pread(fd, buffer, block, at);
            if (got < 0)
                return fail("pread", label);
            if (got == 0)
                break;
            sum = fold(sum, buffer, (size_t)got);
            at += got;
            bytes += (uint64_t)got;
            reads++;
        }
    } else {
        uint64_t count = strtoull(argv[4], NULL, 10), state = strtoull(argv[5], NULL, 10);
        uint64_t pages = (uint64_t)end / PAGE;
        for (uint64_t i = 0; i < count; i++) {
            off_t at = (off_t)(splitmix64(&state) % pages) * PAGE;
            ssize_t got = pread(fd, buffer, PAGE, at);
            if (got != PAGE)
                return fail("pread", label);
            sum = fold(sum, buffer, PAGE);
            bytes += PAGE;
            reads++;
        }
    }
    double seconds = now() - start;
    printf("DISKBENCH RESULT %s %s reads=%" PRIu64 " bytes=%" PRIu64
           " seconds=%.9f checksum=%016" PRIx64 "\n",
           label, argv[1], reads, bytes, seconds, sum);
    fflush(stdout);
    pause_ms(pause);
    close(fd);
    free(buffer);
    return 0;
}
