/* Crashes on purpose, one way per mode (from the kernel fault lab). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "shared.h"

struct node { char pad[0x100]; struct node *next; };

__attribute__((noinline)) long read_null_offset(struct node *n) { return (long)n->next; }       /* NULL+0x100 read */
static const char ro_msg[] = "read-only";
__attribute__((noinline)) void write_ro(char *p) { p[0] = 'R'; }                                 /* write to .rodata */
__attribute__((noinline)) void call_null(void (*f)(void)) { f(); }                               /* fetch from 0 */
__attribute__((noinline)) size_t libc_strlen(const char *s) { return strlen(s) + 1; }            /* fault inside libc */
__attribute__((noinline)) long gpf(void) { return *(volatile long *)0x8000000000000000UL; }      /* non-canonical */
__attribute__((noinline)) int divide(int a, int b) { return a / b; }                             /* #DE */
__attribute__((noinline)) void ud2(void) { __builtin_trap(); }                                   /* #UD */
#if defined(__x86_64__)
/* EFLAGS.AC set, then a misaligned load: #AC, which the kernel turns into SIGBUS */
__attribute__((noinline)) long misaligned(char *p) {
    __asm__ volatile("pushf; orl $0x40000, (%%rsp); popf" ::: "memory", "cc");
    return *(volatile long *)(p + 1);
}
#endif
#if defined(__aarch64__)
__attribute__((noinline)) void int3(void) { __asm__ volatile("brk #0"); }                         /* BRK */
#else
__attribute__((noinline)) void int3(void) { __asm__ volatile("int3"); }                          /* #BP */
#endif

static void *worker(void *arg) {
    pthread_setname_np(pthread_self(), "worker-7");
    printf("tid=%d\n", gettid()); fflush(stdout);
    return (void *)read_null_offset((struct node *)arg);
}

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "null";
    volatile int zero = 0;
    printf("pid=%d\nweight=%ld\n", getpid(), name_weight(m)); fflush(stdout);
    if (!strcmp(m, "null"))      return (int)read_null_offset(NULL);
    if (!strcmp(m, "rodata"))    { write_ro((char *)ro_msg); return 0; }
    if (!strcmp(m, "execnull"))  { call_null((void (*)(void))(long)zero); return 0; }
    if (!strcmp(m, "libc"))      { const char *volatile p = NULL; return (int)libc_strlen(p); }
    if (!strcmp(m, "thread"))    { pthread_t t; pthread_create(&t, NULL, worker, NULL); pthread_join(t, NULL); return 0; }
    if (!strcmp(m, "gpf"))       return (int)gpf();
    if (!strcmp(m, "div"))       return divide(1, zero);
    if (!strcmp(m, "ud2"))       { ud2(); return 0; }
    if (!strcmp(m, "int3"))      { int3(); return 0; }
#if defined(__x86_64__)
    if (!strcmp(m, "bus"))       { static long words[2]; return (int)misaligned((char *)words); }
#endif
    fprintf(stderr, "unknown mode\n"); return 2;
}
