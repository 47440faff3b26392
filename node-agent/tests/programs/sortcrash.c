/* A crash inside a callback called by the C library: qsort's comparator reads
 * item->next->key where next is NULL. The stack runs from the comparator through libc's own
 * frames (no frame pointers, no debug information: only its .eh_frame) back to main. */
#include <stdlib.h>

struct Item {
    int key;
    struct Item *next;
};

__attribute__((noipa)) static int by_next_key(const void *a, const void *b) {
    const struct Item *x = a, *y = b;
    return x->next->key - y->next->key; /* crash:compare */
}

int main(int argc, char **argv) {
    struct Item items[4] = {{3, 0}, {1, 0}, {2, 0}, {argc, 0}};
    (void)argv;
    qsort(items, 4, sizeof items[0], by_next_key); /* call:qsort */
    return items[0].key;
}
