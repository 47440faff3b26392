/* Linked into the aarch64 test programs, which run under qemu-user where no kernel log is
 * written: on SIGSEGV it prints what the arm64 kernel would print about the fault, taken
 * from the signal's own facts (si_addr, the saved registers, the ESR record if the signal
 * frame has one) and from /proc/self/maps, then lets the signal kill the process. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

#define ESR_MAGIC 0x45535201

static void report(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    struct sigcontext *sc = (struct sigcontext *)&uc->uc_mcontext;
    char text[4096];
    int n = snprintf(text, sizeof text, "fault.addr=%#lx\nfault.pc=%#llx\nfault.sp=%#llx\n",
                     (unsigned long)info->si_addr, sc->pc, sc->sp);
    for (int i = 0; i < 31; i++)
        n += snprintf(text + n, sizeof text - n, "fault.x%d=%#llx\n", i, sc->regs[i]);
    /* The records after the registers: {magic, size}, ESR_MAGIC carries the ESR. */
    for (size_t at = 0; at + 8 <= sizeof sc->__reserved;) {
        struct _aarch64_ctx *head = (struct _aarch64_ctx *)(sc->__reserved + at);
        if (head->magic == 0 || head->size == 0)
            break;
        if (head->magic == ESR_MAGIC)
            n += snprintf(text + n, sizeof text - n, "fault.esr=%#llx\n",
                          ((struct esr_context *)head)->esr);
        at += head->size;
    }
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (maps && fgets(line, sizeof line, maps)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx", &start, &end) == 2 && start <= sc->pc && sc->pc < end)
            n += snprintf(text + n, sizeof text - n, "fault.vma=%s", line);
    }
    if (maps)
        fclose(maps);
    write(1, text, n);
    signal(signo, SIG_DFL); /* returning re-runs the load, which now kills the process */
}

__attribute__((constructor)) static void install(void) {
    struct sigaction action = {.sa_sigaction = report, .sa_flags = SA_SIGINFO};
    sigaction(SIGSEGV, &action, NULL);
}
