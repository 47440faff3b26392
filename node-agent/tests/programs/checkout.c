/* A checkout service that crashes as it starts: the order has no payment, and
 * payment_total() reads order->payment->amount_cents through NULL. Built -O2
 * -fomit-frame-pointer, dynamically linked and stripped, with its debug file under
 * /usr/lib/debug/.build-id, as the pod test's image holds it. Every function is noipa, and
 * each uses its callee's result afterwards, so the call stack stays as written:
 * main -> checkout -> charge -> payment_total. */
#include <stdio.h>

struct Payment {
    long id;
    char card[24];
    long amount_cents;
};

struct Order {
    int id;
    int items;
    struct Payment *payment;
};

__attribute__((noipa)) long payment_total(const struct Order *order) {
    return order->payment->amount_cents * order->items; /* crash:here */
}

__attribute__((noipa)) long charge(const struct Order *order) {
    long total = payment_total(order); /* call:charge */
    printf("charged %ld\n", total);
    return total;
}

__attribute__((noipa)) int checkout(struct Order *order) {
    long charged = charge(order); /* call:checkout */
    printf("order %d charged %ld\n", order->id, charged);
    return charged > 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    struct Order order = {.id = argc, .items = 2, .payment = NULL};
    (void)argv;
    int rc = checkout(&order); /* call:main */
    printf("rc=%d\n", rc);
    return rc;
}
