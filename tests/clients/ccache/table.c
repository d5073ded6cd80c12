/* A larger object, so a cache entry spans more than one small read. */
#include "util.h"

static const unsigned char table[16384] = {1, 2, 3};

int table_sum(void) {
    int sum = 0;
    for (unsigned i = 0; i < sizeof table; i++) {
        sum += table[i];
    }
    return sum + triangle(3);
}
