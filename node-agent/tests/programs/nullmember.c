/* NULL pointers behind struct members, as in qemu's bdrv_co_flush() (crashwatch's seed crash).
 * Built -O2 -fomit-frame-pointer, stripped, with separate debug info. Each mode prints the
 * offset the compiler gave the member, so the test checks the agent against the compiler. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "shared.h"

struct BlockDriverState;
struct BlockDriver {
    const char *format_name;
    int instance_size;
    char reserved[0x250];
    int (*bdrv_co_flush)(struct BlockDriverState *bs);
};
struct Stats { long reads; long writes; long flushes; };
struct BlockDriverState {
    int open_flags;
    char filename[0x34];
    struct BlockDriver *drv;
    struct Stats stats;
};
struct Job { int id; struct BlockDriverState *bs; };

__attribute__((noinline)) int bdrv_co_flush(struct BlockDriverState *bs) {
    if (bs->open_flags & 0x40)
        return 0;
    return bs->drv->bdrv_co_flush(bs); /* crash:chain */
}

__attribute__((noinline)) long bdrv_flushes(struct BlockDriverState *bs) {
    return bs->stats.flushes; /* crash:direct */
}

__attribute__((noinline)) void job_count_write(struct Job *job) {
    job->bs->stats.writes++; /* crash:nested */
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "chain";
    static struct BlockDriverState no_driver = { .open_flags = 2 };
    static struct Job orphan = { .id = 7 };
    printf("pid=%d\nweight=%ld\n", getpid(), name_weight(mode));
    if (!strcmp(mode, "chain")) {
        printf("offset=%#zx\n", offsetof(struct BlockDriver, bdrv_co_flush));
        fflush(stdout);
        return bdrv_co_flush(&no_driver);
    }
    if (!strcmp(mode, "direct")) {
        printf("offset=%#zx\n", offsetof(struct BlockDriverState, stats.flushes));
        fflush(stdout);
        return (int)bdrv_flushes(NULL);
    }
    if (!strcmp(mode, "nested")) {
        printf("offset=%#zx\n", offsetof(struct BlockDriverState, stats.writes));
        fflush(stdout);
        job_count_write(&orphan);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
