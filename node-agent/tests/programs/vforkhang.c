/* A process that hangs in uninterruptible sleep until it is killed: its vfork child pauses
 * instead of calling exec, so the parent waits in the kernel (state D, killable). Installed
 * as `qemu-nbd` in the test's image, the name the agent watches by default. */
#include <signal.h>
#include <unistd.h>

int main(void) {
    if (vfork() == 0) {
        pause(); /* never exec: the parent stays in D */
        _exit(0);
    }
    return 0;
}
