/* Calls deep() of nested.S with NULL: a read of NULL->next (offset 0x100). */
#include <stdio.h>
#include <unistd.h>
struct node;
long deep(struct node *n);
int main(int argc, char **argv) {
    printf("pid=%d\n", getpid());
    fflush(stdout);
    return (int)deep(argc > 5 ? (struct node *)argv : 0);
}
