/* An inline helper both test programs use, so that dwz moves its abstract instance into the
 * supplementary file and inlined frames must be named from there. */
#include <string.h>

static inline long name_weight(const char *name) {
    long weight = 0;
    for (size_t i = 0; name[i]; i++)
        weight += (unsigned char)name[i] * (long)(i + 1);
    return weight + (long)strlen(name);
}
